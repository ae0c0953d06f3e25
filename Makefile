# evo-merge: `make demo` runs the main job on the embedded pico zoo, `make test` runs the tests.
# Both create the virtual environment (.venv) when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env demo test test-all test-compat postgres lint clean

# The stamp depends on the files that define the environment, so editing them reinstalls.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel here; a bare `torch` would pull several GB of CUDA packages.
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/python -m evomerge_opt.demo

# Default test run (< ~15 min on 2 cores): everything but tests marked slow; PostgreSQL tests run when
# scripts/postgres.sh can start a server (CI installs it).
test: env
	bash scripts/run_tests.sh

test-all: env
	bash scripts/run_tests.sh --all

# The DFS transformers-compatibility matrix (every version in scripts/compat_env.py) and the GGUF check.
test-compat: env
	$(VENV)/bin/python -m pytest -m compat tests/test_dfs_compat.py

lint: env
	$(VENV)/bin/ruff check evomerge_opt tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
