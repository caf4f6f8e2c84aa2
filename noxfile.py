"""The matrix: the test suite on each Python of the user's side, with each dependency set.

- ``locked``: ``requirements.lock``, the set ``make test`` installs, on Python 3.10-3.13;
- ``newest``: what a fresh install resolves today, on the newest Python;
- ``lowest``: the lowest versions ``pyproject.toml`` declares (uv's lowest-direct
  resolution), on the oldest Python.

``make matrix`` runs every session on the whole suite; arguments after ``--`` go to pytest
instead (``.ci/run`` gives the end-to-end subset). Environments are made by uv.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
LOCK = "requirements.lock"

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True


def _every_pyenv_python() -> None:
    """Where pyenv installed the Pythons side by side, make all of them visible at once:
    its shims otherwise run only the active version, and nox would find no other."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    installed = sorted(path.name for path in root.glob("versions/3.*") if path.is_dir())
    if installed and "PYENV_VERSION" not in os.environ:
        os.environ.setdefault("PYENV_ROOT", str(root))
        os.environ["PYENV_VERSION"] = ":".join(installed)


_every_pyenv_python()


#: Prints the installed distributions, so that a run's log says what it tested.
SHOW_VERSIONS = (
    "import importlib.metadata as m; "
    "print(' '.join(sorted(f'{d.name}=={d.version}' for d in m.distributions())))"
)


def _install(session: nox.Session, *args: str) -> None:
    """The project with its dev extras, and pip: tests/podman/setup fetches the image's
    pytest with it (a uv environment has none of its own)."""
    session.install(*args, "-e", ".[dev]", "pip>=24")


def _pytest(session: nox.Session) -> None:
    session.run("python", "-c", SHOW_VERSIONS, silent=False)
    session.run("pytest", "-n", "2", "-q", *session.posargs)


@nox.session(python=PYTHONS)
def locked(session: nox.Session) -> None:
    _install(session, "-c", LOCK)
    _pytest(session)


@nox.session(python=PYTHONS[-1])
def newest(session: nox.Session) -> None:
    _install(session, "--upgrade")
    _pytest(session)


@nox.session(python=PYTHONS[0])
def lowest(session: nox.Session) -> None:
    _install(session, "--resolution", "lowest-direct")
    _pytest(session)
