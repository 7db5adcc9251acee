# Two commands do all set-up on a fresh machine: `make repro` and `make test`.
# Both create .venv (Python 3.11) if missing and install the pinned dependencies.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Stage commands in dvc.yaml call `fgclip` and `dvc` from the venv.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: install browser postgres repro test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 required, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

repro: $(STAMP)
	dvc repro

# The browser tests (tests/e2e/browser.py) drive Debian's chromium: installed here when
# missing and this is Debian as root (CI is); otherwise they fail saying how to install it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends chromium \
	      || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; \
	  else echo "chromium not found: install Debian's chromium (sudo apt-get install chromium) for the browser tests" >&2; fi; }

# The scaling tests (tests/e2e/loopback_stack.py) start Debian's PostgreSQL server themselves:
# installed here when missing and this is Debian as root; otherwise they fail saying how.
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends postgresql \
	      || { apt-get update -q && apt-get install -y -q --no-install-recommends postgresql; }; \
	  else echo "PostgreSQL not found: install Debian's postgresql (sudo apt-get install postgresql) for the scaling tests" >&2; fi; }

test: $(STAMP) browser postgres
	pytest

lint: $(STAMP)
	ruff check fgclip pipeline tests benchmarks

bench: $(STAMP)
	python benchmarks/train_throughput.py

clean:
	rm -rf data models checkpoints metrics/health.json plots mlflow.db mlartifacts
