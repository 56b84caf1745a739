"""Shared fixtures: a tiny byte-level tokenizer with a chat template and a tiny random Llama,
saved with `save_pretrained` so the scripts load them through the same `from_pretrained`
path that real users take. Everything is built in code from a fixed seed: no network."""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so tests can `import reinforce_kl`, `import kernels`, ...
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Before `kernels` is imported: lets tests run the Triton kernels on CPU tensors (impl="triton").
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Hva er hovedstaden i Norge? Oslo er hovedstaden i Norge.",
    "What is the capital of Norway? Oslo is the capital of Norway.",
    "¿Cuál es la capital de España? Madrid es la capital de España.",
    "Привет, как дела? Хорошо, спасибо.",
    "བོད་ཀྱི་རྒྱལ་ས་ནི་ལྷ་ས་ཡིན། 你好，世界。 مرحبا بالعالم नमस्ते दुनिया",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,;:-",
]


def make_tiny_tokenizer():
    """A byte-level BPE (vocab 384) with ChatML-style special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer):
    """Folder with a tiny random causal LM + tokenizer (float32, 2 layers, hidden 64)."""
    path = tmp_path_factory.mktemp("tiny-lm")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_tokenizer):
    """Folder with a tiny random sequence-classification model (num_labels=1) + tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-rm")
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, num_labels=1,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def cpu_only(monkeypatch):
    """The in-process run of a 1-process vs 2-process comparison must run where torchrun's runs do
    (CPU, gloo: run_torchrun hides the GPUs), or a GPU machine compares CUDA with CPU numerics."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def run_torchrun(script, args, nproc=2, timeout=600, env=None):
    """Run `torchrun --nproc_per_node=nproc script args` on CPU (gloo); return CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# ---- exact sampling distributions (tests of the keyed sampler and of every script's rollout)
def nucleus_distribution(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """softmax(logits / T) restricted to the smallest most-likely set with mass >= top_p, renormalised."""
    z = [x / temperature for x in logits]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    p = [x / sum(e) for x in e]
    keep, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass >= top_p:
            break
        keep.add(i)
        mass += p[i]
    total = sum(p[i] for i in keep)
    return [p[i] / total if i in keep else 0.0 for i in range(len(p))]


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # chi-square quantile 0.999 by degrees of freedom
