# keye_train developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo test test-fast lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	# CPU machines: this pin resolves to the local CPU build; an unpinned torch would pull CUDA wheels.
	$(PIP) install -q torch==2.13.0
	# DeepSpeed builds from source and imports torch while building: without build isolation it uses the
	# torch above instead of fetching another one.
	$(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q -e ".[dev]"
	# keye-vl-utils is the preprocessing reference for parity tests; its declared dependencies
	# (torchvision) have no CPU build matching torch 2.13.0, so it is installed alone.
	$(PIP) install -q --no-deps keye-vl-utils==1.5.2
	# megatron-core reads Megatron-LM .bin/.idx text datasets (IndexedDataset); its declared dependencies
	# are not needed for that and would pull GPU packages, so it is installed alone too.
	$(PIP) install -q --no-deps megatron-core==0.16.1
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install keye_train with its dev extras (CPU torch)

demo: $(STAMP)  ## the whole curriculum (stages 0-3, merge, export) on the tiny model, 2 processes, CPU
	rm -rf demo_out
	$(VENV)/bin/keye-demo --out demo_out

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)  ## run the suite without slow tests
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff check and format check
	$(VENV)/bin/ruff check keye_train tests bench tools
	$(VENV)/bin/ruff format --check keye_train tests bench tools

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix keye_train tests bench tools
	$(VENV)/bin/ruff format keye_train tests bench tools

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
