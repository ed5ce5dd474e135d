# Two entry points (see README "Quick start"): `make demo` and `make test`.
# Each does its own idempotent set-up: .venv in the repo root, pip install, Mosquitto via apt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HASH := $(shell sha256sum pyproject.toml | cut -c1-12)
RUNTIME := $(VENV)/.runtime-$(HASH)
DEV := $(VENV)/.dev-$(HASH)
# Portable llama.cpp build (the default -march=native only runs on the CPU type that built it).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: setup setup-dev demo test lint mosquitto bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The daemon's own dependencies (no torch): enough for `make demo`.
$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	@touch $@

# Plus the test tools, and torch/timm to prove the torch-free backbone equals timm's.
$(DEV): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@ $(RUNTIME)

setup: $(RUNTIME)
setup-dev: $(DEV)

mosquitto:
	@bash .ci/ensure-mosquitto

demo: setup mosquitto
	$(PY) -m appliance demo --workspace $(CURDIR)/demo-workspace

lint: setup-dev
	$(PY) -m ruff check appliance export train tests bench examples
	$(PY) -m ruff format --check appliance export train tests bench examples

test: setup-dev mosquitto lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup-dev
	$(PY) -m bench.backbone_parity
	$(PY) -m bench.narrative_speed
	$(PY) -m bench.daemon_throughput
	$(PY) -m bench.memory_growth

clean:
	rm -rf demo-workspace .pytest_cache
