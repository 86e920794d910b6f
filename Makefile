# Every target sets itself up on a fresh machine: venvs, project + extras, Mosquitto.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= agent,aggregator,broker,embedded,dev
STAMP := $(VENV)/.installed-$(shell echo $(EXTRAS) | tr ',' '-')
TFLITE_VENV := .tflite-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help venv tflite-venv mosquitto chromium datasets demo lint test bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# the smartwatch dataset ships inside seglearn; --no-deps keeps scipy/scikit-learn out
	$(BIN)/pip install -q --no-deps seglearn==1.2.5
	touch $@

venv: $(STAMP)  ## create .venv and install fedmq with all extras

$(TFLITE_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/pip install -q -e ".[agent-tflite]"
	touch $@

tflite-venv: $(TFLITE_VENV)/.installed  ## a separate agent env with tflite-runtime (needs numpy<2)

mosquitto:  ## install Mosquitto (apt-get) when the binary is missing
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q mosquitto mosquitto-clients; }

chromium:  ## install Debian's Chromium (apt-get) for tests/test_dashboard.py when it is missing
	@[ -x /usr/bin/chromium ] || { echo "installing chromium with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

datasets:  ## Debian's Fashion-MNIST (for the paper experiments; the watch data comes with the venv)
	@[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || { \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

# FedAvgM (server momentum 0.9, server lr 0.3), E=1, 60 rounds: 80.5% mean over 3 seeds (bench/RESULTS.md)
DEMO_ARGS ?= --dataset watch --rounds 60 --epochs 1 --lr 0.1 --lr-decay 0.97 --strategy fedavgm --server-lr 0.3
demo: venv mosquitto  ## a federated run: 8 agents (one per subject) on the smartwatch data, vs centralized
	PATH="$$PATH:/usr/sbin" $(BIN)/fedmq-aggregator simulate $(DEMO_ARGS)

# mypy cannot follow setuptools' editable finder (the folder broker/ installs as fedmq.broker), and run
# on broker/ it would name the modules broker.* and lose every fedmq.broker import. So it checks a link
# tree, build/mypy/fedmq/broker -> broker/, where module names, imports and py.typed resolve exactly as
# in the installed wheel (fedmq is a namespace package). Settings: [tool.mypy] in pyproject.toml.
MYPY_TREE := build/mypy
lint: venv  ## static checks: ruff (pyflakes, import order) and mypy on the contract package fedmq.broker
	$(BIN)/ruff check .
	@mkdir -p $(MYPY_TREE)/fedmq && ln -sfn $(CURDIR)/broker $(MYPY_TREE)/fedmq/broker
	cd $(MYPY_TREE) && $(abspath $(BIN))/mypy --config-file $(CURDIR)/pyproject.toml -p fedmq.broker

test: lint venv tflite-venv mosquitto chromium  ## static checks, then the whole test suite (fault and security tests included)
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m pytest -m "not slow" tests

bench: venv mosquitto  ## benchmarks (a separate .bench-venv holds the Flower reference)
	bash bench/run.sh

clean:
	rm -rf $(VENV) $(TFLITE_VENV) .bench-venv .pytest_cache build *.egg-info
