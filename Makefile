# The README documents these targets. `make demo` and `make test` set up everything
# they need on a fresh machine (Python 3.11 with pip); nothing is installed by hand.
PYTHON ?= python3
HERE := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
VENV := .venv
BIN := $(VENV)/bin
# The embedded demo lake: fixed size and seed; acceptance figures are quoted on it.
DEMO_CUSTOMERS ?= 20000
DEMO_SEED ?= 42
DEMO_AS_OF ?= 2025-12-31
PORT ?= 3000
# BentoML's model and Bento store lives with the other generated data.
export BENTOML_HOME ?= $(CURDIR)/data/bentoml
export BENTOML_DO_NOT_TRACK ?= True
STAGE ?= all
SIZES ?= 100000,1000000
# bench ENGINE=spark: the medallion stage builds gold with DuckDB and Spark (Sail) side by side;
# the features and refresh stages run with both engines, interleaved (driver memory, agreement)
ENGINE ?= duckdb
# bench LAKE=azurite: the medallion stage builds the lake in a container on Azurite (local: a folder);
# demo LAKE=azurite: the demo's lake_root is az://$(AZURITE_CONTAINER)/lake, the container on an
# Azurite started from node_modules on 127.0.0.1 for the run (its blobs kept in data/azurite)
LAKE ?= local
AZURITE_CONTAINER ?= demo
# bench PROFILE=sparse: lakes of that generator profile (c360ml.synth.params.PROFILES), cached
# apart from the default's and their figures in benchmarks/results/<stage>_sparse.json
PROFILE ?= default

.PHONY: install demo demo-chain test test-fast docs lint bench clean serve bento mlflow-ui browser

install: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[ml,dev]'
	touch $@

# Azurite (Microsoft's Azure Storage emulator) for the lake-on-az:// tests, pinned in
# package.json / package-lock.json.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error && touch $@

demo: install
ifeq ($(LAKE),azurite)
	$(BIN)/python $(HERE)tests/storage/azurite.py --location $(CURDIR)/data/azurite \
		--container $(AZURITE_CONTAINER) --lake az://$(AZURITE_CONTAINER)/lake \
		-- $(MAKE) --no-print-directory -f $(HERE)Makefile demo-chain
else
	@$(MAKE) --no-print-directory -f $(HERE)Makefile demo-chain
endif

# The demo's commands, on the lake C360ML_LAKE_ROOT names (else c360ml.yaml's, else data/lake).
demo-chain:
	$(BIN)/c360ml generate --customers $(DEMO_CUSTOMERS) --seed $(DEMO_SEED) --fresh
	$(BIN)/c360ml build all
	$(BIN)/c360ml train --as-of $(DEMO_AS_OF)
	$(BIN)/c360ml refresh
	@# The service with a one-off token (no dev mode) in its own process group, the segment
	@# workflow against it, then the group is stopped.
	@set -e; token=$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(24))'); \
	C360ML_API_TOKENS=$$token setsid $(BIN)/c360ml serve --port $(PORT) > data/serve.log 2>&1 & pid=$$!; \
	trap 'kill -- -$$pid 2>/dev/null || true' EXIT; \
	for i in $$(seq 1 120); do curl -sf localhost:$(PORT)/readyz >/dev/null && break; sleep 1; done; \
	C360ML_API_TOKEN=$$token $(BIN)/c360ml segments run --endpoint http://127.0.0.1:$(PORT)
	$(BIN)/c360ml report
	@echo "report:       $(CURDIR)/data/reports/retention_report.html"
	@echo "MLflow UI:    make mlflow-ui   (http://127.0.0.1:5000)"
	@lake=$${C360ML_LAKE_ROOT:-$(CURDIR)/data/lake}; \
	echo "scores table: $$lake/gold/churn_scores (Delta); CI-D snapshot: $$lake/export/ci-d/"

serve: install
	$(BIN)/c360ml serve --port $(PORT)

bento: install
	$(BIN)/python -m pip wheel -q --no-deps -w dist .
	$(BIN)/python -c "from c360ml.config import load_settings; from c360ml.model.packaging import import_champion; print(import_champion(load_settings()))"
	$(BIN)/python -m bentoml build

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/data/mlflow/mlflow.db --host 127.0.0.1 --port 5000

# The API reference, from the docstrings (pydoc: no extra dependency).
DOCS_DIR ?= data/docs
docs: install
	mkdir -p $(DOCS_DIR)
	cd $(DOCS_DIR) && $(CURDIR)/$(BIN)/python -m pydoc -w c360ml c360ml.api
	@echo "API reference: $(abspath $(DOCS_DIR))/c360ml.api.html"

lint: install
	$(BIN)/ruff check src tests benchmarks pipelines service
	$(BIN)/ruff format --check src tests benchmarks pipelines service

# The report test drives a real headless browser: Debian's chromium, installed here once.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Two workers (pytest-xdist): a module whole on one, the Spark modules together, the long
# ones first (tests/conftest.py); about 40% less time than one process on 2 cores.
test: install lint browser
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# While developing: the suite without the end-to-end runs over generated lakes (CI runs all).
test-fast: install lint
	$(BIN)/pytest -q -m "not slow"

bench: install
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[ml,dev,bench]'
	$(BIN)/python benchmarks/run.py --stage $(STAGE) --sizes $(SIZES) --engine $(ENGINE) --lake $(LAKE) \
		--profile $(PROFILE)

clean:
	rm -rf data/lake data/truth data/reports data/mlflow data/bentoml data/logs data/serve.log dist \
		data/azurite
