# Two commands do all set-up: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested versions of everything make test installs; `make lock` refreshes it, on purpose.
LOCK := requirements.lock

.PHONY: demo test lint types unit podman chromium matrix lock bench clean dist wheel-check

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c $(LOCK) -e '.[dev,ci]'
	touch $(STAMP)

# The dev environment's own plugins kept quiet: pytest-asyncio's loop-scope notice, and
# pytest-randomly's shuffle (the examples read best in file order).
demo: $(STAMP)
	cd examples && ../$(BIN)/pytest --gpu-cloud --gpu-provider sim -v -p no:randomly \
		-o asyncio_default_fixture_loop_scope=function

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

# The whole suite on Python 3.10-3.13 with the locked set, and on the newest and the lowest
# versions (noxfile.py).
matrix: $(STAMP)
	$(BIN)/nox

lock: $(STAMP)
	$(BIN)/uv pip compile -q --universal --python-version 3.10 --upgrade \
		--custom-compile-command 'make lock' --extra dev --extra ci pyproject.toml -o $(LOCK)

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .nox .wheel-venv dist .pytest_cache .mypy_cache .ruff_cache .gpucloud examples/.gpucloud
