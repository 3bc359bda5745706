# The README's commands. `make test` and `make demo` work on a fresh Debian/Ubuntu machine:
# they create .venv, install celeryfarm into it, and install redis-server when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Render nodes refuse to run as root unless told; a root shell (CI, a fresh VM) tells them.
ALLOW_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: setup redis-server test lint demo up bench bench-quick

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
