# The two commands of the quick start: `make serve` and `make test`. Each creates .venv, installs the
# pinned dependencies (the CPU build of torch 2.13.0), builds the Cython extension, then runs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXT_SRC := $(wildcard ext/*.pyx ext/*.pxd ext/*.h)

.PHONY: serve test lint typecheck unit integration bench bench-micro benchmarks build clean protos debug

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: $(STAMP) $(EXT_SRC)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m protos.generate

serve: build
	$(PY) -m engine.launch $(ARGS)

lint: build
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	ENGINE_BENCH_QUICK=1 $(PY) -m pytest -q -p no:randomly tests $(PYTEST_ARGS)

unit: build
	$(PY) -m pytest -q tests/unit

integration: build
	$(PY) -m pytest -q tests/integration

bench: build
	$(PY) -m pytest tests/bench --benchmark-enable --benchmark-only --benchmark-autosave

bench-micro: build
	$(PY) -m bench micro --json bench-micro.json

# Measures everything BENCHMARKS.md shows (about 12 minutes), then redraws its plots and tables.
benchmarks: build
	$(PY) -m bench report --run --results bench/results --markdown BENCHMARKS.md

debug: $(STAMP)
	ENGINE_DEBUG=1 $(PY) setup.py build_ext --inplace --force

clean:
	rm -rf build ext/*.c ext/*.so ext/*.html
