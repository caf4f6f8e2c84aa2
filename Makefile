# Two commands do all set-up: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint types unit podman chromium bench clean dist wheel-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	cd examples && ../$(BIN)/pytest --gpu-cloud --gpu-provider sim -v

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

types: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -n 2 -q

# The container tests' engine: podman, runc and debootstrap installed if missing, and the test
# image built once (cached by a hash of its recipe). Needs root; see README, "Containers".
podman: $(STAMP)
	PYTHON=$(BIN)/python tests/podman/setup

# Headless chromium, which renders the timeline in its test: Debian's package if missing.
chromium:
	scripts/ensure-chromium

test: lint types podman chromium unit

# The release artifacts: an sdist, and a wheel built from it (so a file the sdist lacks fails).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

# The wheel, not the checkout, in a fresh environment: a session on the simulated cloud.
wheel-check: dist
	rm -rf .wheel-venv
	$(PYTHON) -m venv .wheel-venv
	.wheel-venv/bin/python -m pip install -q dist/*.whl numpy  # numpy: examples/' model
	cd examples && ../.wheel-venv/bin/python -c 'import pytest_gpucloud as p; assert "/.wheel-venv/" in p.__file__, p.__file__'
	cd examples && ../.wheel-venv/bin/python -m pytest -p no:cacheprovider -q --gpu-cloud --gpu-provider sim

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .wheel-venv dist .pytest_cache .mypy_cache .ruff_cache .gpucloud examples/.gpucloud
