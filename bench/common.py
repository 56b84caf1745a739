"""What the bench scripts share: random-weight models of published configurations with a byte-level
tokenizer, prompts, memory probes and the header of a result file. (Benchmarks only: the method
scripts never import this.) torch and transformers are imported inside the functions, so a worker
process can read its memory before and after importing them."""
import hashlib
import json
import os
import platform
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map, which byte-level BPE tokenizers (Qwen2's) use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_model_folder(path: Path, config: dict, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> int:
    """A random-weight Qwen2 model of `config` (config.json values) and a byte-level tokenizer whose EOS
    is id V, one past the last logit: never sampled, so every response has the requested length.
    Returns V."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    V = config["vocab_size"]
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab["<eos>"] = V
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token=bytes_to_unicode()[0])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt text, nothing added
    torch.manual_seed(seed)
    cfg = Qwen2Config(**config, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(device):  # random init on the GPU when there is one (seconds instead of minutes)
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return V


def write_prompts(path: Path, model_dir: Path, n: int, length: int, seed: int = 0):
    """n prompts of `length` random lowercase letters = `length` tokens (checked through the tokenizer
    of `model_dir`, as the benchmarked code loads it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    rows = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(n)]
    lens = {len(tok(r, add_special_tokens=False)["input_ids"]) for r in rows}
    assert lens == {length}, f"prompts tokenize to {lens} tokens, not {length} ({type(tok).__name__})"
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6


def script_blob(name: str = "reinforce_kl.py") -> str:
    """git's blob id of the script that ran (`git rev-parse <commit>:<name>` names the commit)."""
    data = (ROOT / name).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()[:10]


def machine(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "cpu")
    return f"CPU {cpu}, {os.cpu_count()} cores"


def result_path(out_dir: str, bench: str, gpu: bool, date: str, suffix: str = ".md") -> Path:
    """bench/results/<bench>-<device>-<date>.md (the folder is made)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "-") if gpu else "cpu"
    return out / f"{bench}-{dev}-{date}{suffix}"
