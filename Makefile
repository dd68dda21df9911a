# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
SQLALCHEMY ?= 2.1
EXTRAS ?= test,dashboard
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The other Pythons we claim (requires-python), found under pyenv or on PATH.
PYTHONS ?= 3.10 3.12 3.13
PYENV_ROOT ?= $(HOME)/.pyenv
# Extra requirements of a venv; test-pythons pins the oldest OpenTelemetry claimed on 3.10.
PINS ?=
OLDEST_OTEL := opentelemetry-api==1.26.0 opentelemetry-sdk==1.26.0 \
	opentelemetry-exporter-prometheus==0.47b0
RECORDER_TESTS := tests/test_recorder.py tests/test_runtime.py tests/test_store.py \
	tests/test_report.py tests/test_otel.py tests/test_rollups.py

.PHONY: setup test test-sa20 test-sqlalchemy test-pythons test-python test-no-cext \
	wheel-check demo lint format bench clean

setup: $(VENV)/.installed-$(SQLALCHEMY)

$(VENV)/.installed-$(SQLALCHEMY): pyproject.toml setup.py $(wildcard instrument/*.c instrument/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' 'sqlalchemy~=$(SQLALCHEMY).0' $(PINS)
	rm -f $(VENV)/.installed-*
	touch $@

## test: run the whole suite (SQLite, PostgreSQL, dashboard, browser) in its own venv
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

## test-sa20: the suite on SQLAlchemy 2.0.x, in a second venv, but for the test files that
## never touch SQLAlchemy (the dashboard and store reading, histograms, packaging): those
## run once, on 2.1
SA_INDEPENDENT_TESTS := tests/test_dashboard.py tests/test_rollup_reading.py \
	tests/test_histogram.py tests/test_rollups.py tests/test_packaging.py \
	tests/test_exported_members.py tests/test_browser.py
test-sa20:
	$(MAKE) test VENV=.venv-sa20 SQLALCHEMY=2.0 \
		PYTEST_ARGS="$(PYTEST_ARGS) $(addprefix --ignore=,$(SA_INDEPENDENT_TESTS))"

## test-sqlalchemy: SQLAlchemy's own pool, engine, session and asyncio tests, with and
## without a monitor on every pool; plus test_pool.py with --pool-leaks (~1.5 min)
test-sqlalchemy: setup
	$(PY) -s tests/sqlalchemy_suite/run.py

## wheel-check: build the wheel, install it in a fresh venv outside the clone and run
## demo, report and the dashboard from it (1-2 min; no .venv needed)
wheel-check:
	PYTHON=$(PYTHON) .ci/wheel-check

## test-pythons: the recorder, runtime, store and report tests on every other Python we
## claim, each in its own venv with the C helpers built (CI=true: a missing one fails;
## SQLAlchemy 2.0 and the oldest OpenTelemetry we claim on 3.10, 2.1 and the newest on
## the others), then once without the helpers
test-pythons:
	@set -e; for v in $(PYTHONS); do $(MAKE) --no-print-directory test-python PYVER=$$v; done
	$(MAKE) --no-print-directory test-no-cext

test-python:
	@py=; for c in $$(ls -d $(PYENV_ROOT)/versions/$(PYVER).*/bin/python$(PYVER) 2>/dev/null \
		| sort -rV) $$(command -v python$(PYVER)); do \
		if "$$c" -c '' 2>/dev/null; then py=$$c; break; fi; done; \
	test -n "$$py" || { echo "no working python$(PYVER) (in $(PYENV_ROOT) or on PATH)"; exit 1; }; \
	$(MAKE) --no-print-directory setup PYTHON=$$py VENV=.venv-py$(PYVER) EXTRAS=test \
		SQLALCHEMY=$(if $(filter 3.10,$(PYVER)),2.0,2.1) \
		PINS="$(if $(filter 3.10,$(PYVER)),$(OLDEST_OTEL))"
	CI=true POOLSCOPE_REQUIRE_CEXT=1 .venv-py$(PYVER)/bin/python -m pytest $(RECORDER_TESTS) \
		-q -p no:cacheprovider $(PYTEST_ARGS)

## test-no-cext: the same tests with POOLSCOPE_NO_CEXT=1 (pure Python; the C runs skip)
test-no-cext: setup
	POOLSCOPE_NO_CEXT=1 $(PY) -m pytest $(RECORDER_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS)

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
	rm -rf .venv .venv-sa20 .venv-py3.* *.egg-info .pytest_cache .cache
