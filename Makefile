# Exchange Collector. `make` alone lists the targets.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# `make test` runs on this many pytest-xdist processes: the end-to-end tests mostly wait on real
# processes, so more workers than cores pay off (README, "Development"). Each test file goes whole to
# one process, in the order tests/conftest.py sorts them (end-to-end first).
TEST_WORKERS ?= 6

.DEFAULT_GOAL := help
.PHONY: help install system-deps run demo simulate test test-unit test-soak lint format clean bench bench-soak bench-sinks bench-floor bench-clients

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv and install the collector with its test tools

# Debian packages the tests use: chromium (dashboard test), prometheus (promtool), postgresql and
# redis-server (the sinks' tests, demo and bench run these binaries as their own throwaway servers,
# never the system services the packages set up). Installed only when missing, so a machine that has
# them is left alone and nothing is printed.
SYSTEM_PACKAGES := chromium prometheus postgresql redis-server
system-deps: ## Install chromium, promtool, PostgreSQL and Redis (Debian packages) when missing
	@if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null \
		|| ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v redis-server >/dev/null; then \
		SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		echo "installing Debian packages: $(SYSTEM_PACKAGES)"; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES) >/dev/null; \
	fi

run: install ## Run a worker with config/default.yaml (COLLECTOR_CONFIG picks another file)
	$(VENV)/bin/collector worker -l info

demo: install ## Run simulator + embedded broker + worker together and print where to look
	$(VENV)/bin/collector demo

simulate: install ## Run only the exchange simulator
	$(VENV)/bin/collector simulate

test: install system-deps ## Run the test suite (unit + end-to-end, not soak) on TEST_WORKERS (6) processes
	$(PY) -m pytest -m "not soak" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-unit: install system-deps ## Run the tests that need no broker, simulator or worker
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

test-soak: install ## End-to-end tests too long for `make test` (the broker paused 6 minutes; ~8 min)
	$(PY) -m pytest -m soak $(PYTEST_ARGS)

bench: install system-deps ## Throughput/latency ladder, then the sinks' bench; writes docs/benchmarks.md (~20 min)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.sinks $(BENCH_SINKS_ARGS)

bench-sinks: install system-deps ## Kafka → PostgreSQL and → Redis: 30,000 trades/s steady, and a backlog drain (~4 min)
	$(PY) -m bench.sinks $(BENCH_SINKS_ARGS)

bench-floor: install ## The quiet step's feed read by aiohttp and produced by librdkafka alone, no collector (~4 min)
	$(PY) -m bench.quiet_floor

bench-clients: install ## The market producer alone: librdkafka against aiokafka's one request for all partitions (~5 min)
	$(PY) -m bench.clients

bench-soak: install ## One worker for 6 min at 10,000 events/s, every 30 s: how the embedded broker ages
	$(PY) -m bench --symbols 100 --soak 360 $(BENCH_ARGS)
	$(PY) -m bench.broker_probe

lint: install ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install ## Apply ruff's formatting and fixable lint rules
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# The /live page's chart library, vendored into tables/static/ (served by the worker, never from a
# CDN): TradingView Lightweight Charts, the npm package's standalone build, with its license.
CHARTS_VERSION := 4.2.3
CHARTS_SHA256  := c7dda807d662a95b3d257119ed315cec669e3bdf5aaece75c480a39307f23540
.PHONY: vendor-charts
vendor-charts: ## Fetch the pinned chart library for /live into tables/static (needs npm; committed)
	@tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent lightweight-charts@$(CHARTS_VERSION) >/dev/null && \
		tar -xzf lightweight-charts-$(CHARTS_VERSION).tgz && \
		cp package/dist/lightweight-charts.standalone.production.js $(CURDIR)/tables/static/ && \
		cp package/LICENSE $(CURDIR)/tables/static/lightweight-charts.LICENSE.txt && rm -rf $$tmp
	@echo "$(CHARTS_SHA256)  tables/static/lightweight-charts.standalone.production.js" | sha256sum -c -
