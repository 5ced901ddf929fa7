# ImageBatch: the commands a developer and CI use. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: help install binaries lint unit test faults cluster demo bench clean

help:
	@echo "make demo      run the demo end to end on a local cluster"
	@echo "make test      lint-free unit + end-to-end tests (builds the local cluster if missing)"
	@echo "make unit      unit tests only (no servers)"
	@echo "make faults    the fault drills alone (also part of make test)"
	@echo "make lint      ruff, mypy --strict and the import-linter layering contracts"
	@echo "make cluster   start the local cluster and MinIO; Ctrl-C stops it"
	@echo "make bench     benchmarks; reports go to reports/bench-worker.md and reports/bench-operator.md"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

binaries: install
	$(PY) -m tests.cluster.build

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: install
	$(PY) -m tests.cluster.build helm
	$(PY) -m pytest -m "not e2e" tests

test: binaries
	$(PY) -m pytest tests

faults: binaries
	$(PY) -m pytest -m faults tests

cluster: binaries
	$(PY) -m tests.cluster

demo: binaries
	$(PY) -m tests.demo $(DEMO_ARGS)

bench: binaries
	@command -v mogrify >/dev/null || (apt-get update -qq && apt-get install -y -qq imagemagick) \
		|| echo "imagemagick unavailable: the mogrify comparison will be reported as not measured"
	mkdir -p reports
	$(PY) -m tests.bench.bench_worker --out reports/bench-worker.md
	$(PY) -m tests.bench.bench_operator --out reports/bench-operator.md
	@echo "reports: reports/bench-worker.md reports/bench-operator.md"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
