# The README's commands. `make test` and `make demo` work on a fresh Debian/Ubuntu machine:
# they create .venv, install celeryfarm into it, and install redis-server when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Render nodes refuse to run as root unless told; a root shell (CI, a fresh VM) tells them.
ALLOW_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: setup redis-server test test-oldest lint demo up bench bench-quick

setup: $(VENV)/.installed redis-server

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,flower,cli,metrics]'
	touch $@

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "redis-server is missing: installing it from the Debian packages"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

# The plug-in and the nodes under the oldest Python celeryfarm supports, 3.9 (Katana 6's),
# with the Celery that Python gets (5.6: 5.7 needs 3.10), which `make test` (Python 3.11,
# Celery 5.7) does not see. Flower needs 3.10 and runs on the admins' machines: left out.
# A python3.9 on PATH that runs, else pyenv's; PYTHON_OLDEST=/path/to/python3.9 names another.
PYTHON_OLDEST ?= $(shell for p in python3.9 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.9*/bin/python3.9; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null && { command -v "$$p"; break; }; done)
OLDEST_VENV := .venv-oldest
OLDEST_TESTS := tests/test_units.py tests/test_records.py tests/test_plugin.py \
	tests/test_farmapi_conformance.py tests/test_listing.py tests/test_bad_input.py \
	tests/test_roundtrips.py tests/test_retention.py tests/test_retries.py tests/test_nodes.py \
	tests/test_taskevents.py tests/test_package.py

test-oldest: redis-server
	@test -n "$(PYTHON_OLDEST)" || { echo "no Python 3.9 found: install one, or set PYTHON_OLDEST"; exit 1; }
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON_OLDEST) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet -e '.[test,cli,metrics]'
	$(OLDEST_VENV)/bin/python -c 'import sys, celery; print("Python", sys.version.split()[0], "Celery", celery.__version__)'
	$(OLDEST_VENV)/bin/pytest -p no:cacheprovider $(OLDEST_TESTS)

# A local farm runs three real render jobs, shows their progress, stops.
demo: setup
	$(BIN)/celeryfarm demo $(ALLOW_ROOT)

# A local farm in the foreground until Ctrl-C (see the README).
up: setup
	$(BIN)/celeryfarm up $(ALLOW_ROOT)

# Starts its own Redis and workers, prints the table and updates BENCHMARKS.md (~5 minutes).
bench: setup
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.nodecost
	$(BIN)/python -m benchmarks.failover

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick
	$(BIN)/python -m benchmarks.nodecost --quick
	$(BIN)/python -m benchmarks.failover --quick
