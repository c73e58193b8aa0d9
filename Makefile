# Two entry points (see README): `make train` and `make test`. Both create and reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so that nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(VENV)/bin/engine train --env math

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# Benchmarks print a comparison measured in one run; llm-reasoners is a reference only (no deps).
bench: setup
	$(PY) -m pip install -q --no-deps llm-reasoners
	$(PY) benchmarks/tree_ops.py
	$(PY) benchmarks/search_overhead.py
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/trainer_vs_trl.py
	$(PY) benchmarks/sandbox_throughput.py
