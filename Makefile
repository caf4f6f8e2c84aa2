# Two commands do all set-up: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested versions of everything make test installs; `make lock` refreshes it, on purpose.
LOCK := requirements.lock

.PHONY: demo test lint types unit podman matrix lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c $(LOCK) -e '.[dev,ci]'
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

test: lint types podman unit

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
	rm -rf $(VENV) .nox .pytest_cache .mypy_cache .ruff_cache .gpucloud examples/.gpucloud
