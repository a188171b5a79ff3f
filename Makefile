# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
DOCS_STAMP := $(VENV)/.docs-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# Compiled XLA programs are cached across runs of the demo (NUTS and friends take seconds to
# compile); the tests run without the cache (tests/conftest.py says why).
export JAX_COMPILATION_CACHE_DIR ?= $(HOME)/.cache/emdppl/xla
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 1
# A size limit is what makes JAX lock the cache directory (with none it writes entries unlocked,
# and a test worker that read an entry while another wrote it crashed in XLA's deserialiser);
# the directory is new with the lock (entries written without it lack the access times that
# JAX's size accounting reads).
export JAX_COMPILATION_CACHE_MAX_SIZE ?= 17179869184

# The ArviZ 1.x leg: Python 3.12, arviz>=1 (pinned by constraints-arviz1.txt), no Pyro extra.
# PYTHON312 is python3.12 on PATH if it runs, else pyenv's (its shim fails when 3.12 is not
# pyenv's global version), else empty: then the leg is skipped.
PYTHON312 ?= $(shell for p in python3.12 $$(pyenv root 2>/dev/null || echo "$${PYENV_ROOT:-$$HOME/.pyenv}")/versions/3.12*/bin/python3.12; do \
	"$$p" -c "" >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
VENV312 := .venv312
STAMP312 := $(VENV312)/.installed-$(shell cat pyproject.toml constraints-arviz1.txt | cksum | cut -d' ' -f1)
# The ArviZ workflow tests (tests/test_infer.py until tests/test_arviz.py exists) and the layout;
# --dist loadfile: one worker builds test_arviz.py's module fixture once (not once per worker).
ARVIZ1_TESTS := $(or $(wildcard tests/test_arviz.py),$(wildcard tests/test_infer.py tests/test_svi.py)) \
	tests/test_layout.py

.PHONY: install demo test lint bench docs test-arviz1 gpu-wheels
install: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,pyro]" "arviz<1"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/emdppl demo --out out/demo

# --reruns 1: a test whose worker crashed runs once more (XLA's CPU compiler segfaulted a worker
# now and then; every test has fixed seeds, so a real failure fails its rerun too).
test: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder --reruns 1 --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check emdppl tests examples benchmarks docs

bench: $(STAMP)
	$(BIN)/python benchmarks/nuts_speed.py

# Wheels for an offline GPU image (emdppl and its pure-Python dependencies, < 64 MiB) in .whl/,
# which benchmarks/gpu_check.sh installs next to the image's own JAX.
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py --out .whl

# The documentation site, offline and strict (warnings are errors): site/index.html.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,pyro,docs]" "arviz<1"
	touch $(DOCS_STAMP)

test-arviz1:
	@if [ -z "$(PYTHON312)" ]; then \
		echo "test-arviz1: SKIPPED: no working python3.12 (on PATH or under pyenv); the ArviZ 1.x leg needs Python 3.12"; \
	else \
		$(MAKE) --no-print-directory PYTHON312="$(PYTHON312)" $(STAMP312) && \
		$(VENV312)/bin/pytest -n 2 --reruns 1 --dist loadfile --durations=10 $(ARVIZ1_TESTS); \
	fi

$(STAMP312):
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install --quiet --upgrade "pip>=24"
	$(VENV312)/bin/pip install --quiet -c constraints-arviz1.txt -e ".[dev]" "arviz>=1,<2"
	touch $(STAMP312)
