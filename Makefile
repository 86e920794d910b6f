# Every target sets itself up on a fresh machine: venv, project + extras, Mosquitto.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= agent,aggregator,broker,embedded,dev
STAMP := $(VENV)/.installed-$(shell echo $(EXTRAS) | tr ',' '-')

.PHONY: help venv mosquitto test test-all bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)  ## create .venv and install fedmq with all extras

mosquitto:  ## install Mosquitto (apt-get) when the binary is missing
	@command -v mosquitto >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v mosquitto >/dev/null 2>&1 || { \
	  echo "installing mosquitto with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q mosquitto mosquitto-clients; }

test: venv mosquitto  ## run the whole test suite (fault and security tests included)
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m pytest -m "not slow" tests

test-all: venv mosquitto  ## the suite plus long experiments
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m pytest tests

bench: venv mosquitto  ## benchmarks (separate venv with flwr for the reference)
	bash bench/run.sh

clean:
	rm -rf $(VENV) .bench-venv .pytest_cache build *.egg-info
