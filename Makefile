# Two commands for a fresh machine: `make demo` (offline quickstart) and `make test` (the test suite).
# Each creates the virtual environment and installs what it needs on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on these machines' disk. Keep your own CUDA torch by installing it into
# $(VENV) first (or `make TORCH="torch==X.Y.Z" ...`): an importable torch is never replaced.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m lit_rlhf.quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -n auto   # one worker per core (pytest-xdist)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lit_rlhf tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf runs lightning_logs .pytest_cache
