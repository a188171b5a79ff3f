# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# Compiled XLA programs are cached across runs (NUTS and friends take seconds to compile).
export JAX_COMPILATION_CACHE_DIR ?= $(HOME)/.cache/emdppl/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 1

.PHONY: install demo test lint bench
install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,pyro]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/emdppl demo --out out/demo

test: $(STAMP)
	$(BIN)/pytest -n 2 --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check emdppl tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/nuts_speed.py
