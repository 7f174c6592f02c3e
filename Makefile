# Exchange Collector. `make` alone lists the targets.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run demo simulate test test-unit lint format clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv and install the collector with its test tools

run: install ## Run a worker with config/default.yaml (COLLECTOR_CONFIG picks another file)
	$(VENV)/bin/collector worker -l info

demo: install ## Run simulator + embedded broker + worker together and print where to look
	$(VENV)/bin/collector demo

simulate: install ## Run only the exchange simulator
	$(VENV)/bin/collector simulate

test: install ## Run the whole test suite (unit + end-to-end)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install ## Run the tests that need no broker, simulator or worker
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: install ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install ## Apply ruff's formatting and fixable lint rules
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
