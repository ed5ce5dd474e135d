# Two entry points (see README "Quick start"): `make demo` and `make test`.
# Each does its own idempotent set-up: .venv in the repo root, pip install, Mosquitto via apt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# Portable llama.cpp build (the default -march=native only runs on the CPU type that built it).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: setup demo test lint mosquitto bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

mosquitto:
	@bash .ci/ensure-mosquitto

demo: setup mosquitto
	$(PY) -m appliance demo --workspace $(CURDIR)/demo-workspace

lint: setup
	$(PY) -m ruff check appliance export train tests bench
	$(PY) -m ruff format --check appliance export train tests bench

test: setup mosquitto lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf demo-workspace .pytest_cache
