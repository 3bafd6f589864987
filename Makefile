# The README documents these targets. `make demo` and `make test` set up everything
# they need on a fresh machine (Python 3.11 with pip); nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The embedded demo lake: fixed size and seed; acceptance figures are quoted on it.
DEMO_CUSTOMERS ?= 20000
DEMO_SEED ?= 42
STAGE ?= all
SIZES ?= 100000,1000000

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[ml,dev]'
	touch $@

demo: install
	$(BIN)/c360ml generate --customers $(DEMO_CUSTOMERS) --seed $(DEMO_SEED) --fresh
	$(BIN)/c360ml build all

lint: install
	$(BIN)/ruff check src tests benchmarks pipelines service
	$(BIN)/ruff format --check src tests benchmarks pipelines service

test: install lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[ml,dev,bench]'
	$(BIN)/python benchmarks/run.py --stage $(STAGE) --sizes $(SIZES)

clean:
	rm -rf data/lake data/truth data/reports data/mlflow
