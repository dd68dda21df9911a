# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
SQLALCHEMY ?= 2.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-sa20 test-sqlalchemy wheel-check demo lint format bench clean

setup: $(VENV)/.installed-$(SQLALCHEMY)

$(VENV)/.installed-$(SQLALCHEMY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dashboard]' 'sqlalchemy~=$(SQLALCHEMY).0'
	rm -f $(VENV)/.installed-*
	touch $@

## test: run the whole suite (SQLite, PostgreSQL, dashboard, browser) in its own venv
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

## test-sa20: the same suite on SQLAlchemy 2.0.x, in a second venv
test-sa20:
	$(MAKE) test VENV=.venv-sa20 SQLALCHEMY=2.0

## test-sqlalchemy: SQLAlchemy's own pool, engine, session and asyncio tests, with and
## without a monitor on every pool; plus test_pool.py with --pool-leaks (~1.5 min)
test-sqlalchemy: setup
	$(PY) -s tests/sqlalchemy_suite/run.py

## wheel-check: build the wheel, install it in a fresh venv outside the clone and run
## demo, report and the dashboard from it (1-2 min; no .venv needed)
wheel-check:
	PYTHON=$(PYTHON) .ci/wheel-check

## demo: run the sample app for ~30 s on SQLite, then open the dashboard
demo: setup
	$(PY) -m instrument demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# import-linter reads packages from disk: lay out instrument/ as the wheel does, with
	@# dashboard/ and sample_app/ inside it (symlinked files), and check the layers there.
	rm -rf build/lint && mkdir -p build/lint
	cp -rs $(CURDIR)/instrument build/lint/instrument
	cp -rs $(CURDIR)/dashboard build/lint/instrument/dashboard
	cp -rs $(CURDIR)/sample_app build/lint/instrument/sample_app
	cd build/lint && $(CURDIR)/$(VENV)/bin/lint-imports --config $(CURDIR)/pyproject.toml

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) bench/overhead.py
	$(PY) bench/ingest.py

clean:
	rm -rf .venv .venv-sa20 *.egg-info .pytest_cache .cache
