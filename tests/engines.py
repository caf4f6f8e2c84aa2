"""The real container engines of the container tests: podman, set up on this machine by
``tests/podman/setup`` (``make podman``), and docker where a daemon answers.

When podman cannot run here, the run stops and says why: the first container test errors
with the reason and the session ends there (also under xdist), so a container test never
passes or skips for want of its engine. docker is optional: without a daemon, its tests
skip, saying so.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

PODMAN_DIR = Path(__file__).parent / "podman"
SETUP_TIMEOUT_S = 900  # a first build: apt-get, debootstrap and pytest's wheels
# How each engine marks the inside of its containers.
INSIDE = {"podman": "/run/.containerenv", "docker": "/.dockerenv"}


@dataclass(frozen=True)
class Engine:
    """One engine with the test image in its store. ``path``: a folder to put first on the
    PATH of a machine's commands, where the engine's CLI runs configured for the tests."""

    name: str
    image: str
    path: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The engine's CLI, as the tests configure it."""
        done = subprocess.run(
            [self.name, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name} {shlex.join(args)}: {done.stderr.strip()}")
        return done

    def containers(self, name: str) -> list[str]:
        """The names of the containers, running or not, whose name contains ``name``."""
        listed = self("ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}")
        return listed.stdout.split()

    def derived(self, tag: str, env: str) -> str:
        """The test image with one more environment variable (``NAME=value``), as ``tag``."""
        image = f"{self.image.rpartition(':')[0]}-{tag}:{self.image.rpartition(':')[2]}"
        if self("image", "inspect", image, check=False).returncode != 0:
            container = self("create", self.image, "true").stdout.split()[-1]
            try:
                self("commit", "--change", f"ENV {env}", container, image)
            finally:
                self("rm", "-f", container)
        return image


def podman(folder: Path, session: pytest.Session) -> Engine:
    """podman, set up by ``tests/podman/setup``; stops the ``session`` when that fails."""
    try:
        done = subprocess.run(
            [str(PODMAN_DIR / "setup")],
            env={**os.environ, "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        _stop(session, f"tests/podman/setup did not finish within {SETUP_TIMEOUT_S} s")
    said = done.stderr.strip().splitlines()
    if done.returncode != 0:
        _stop(session, said[-1] if said else f"tests/podman/setup: exit {done.returncode}")
    real = shutil.which("podman")
    assert real is not None, "tests/podman/setup succeeded without podman"
    conf = str(PODMAN_DIR / "containers.conf")
    # The machines' commands run with an environment of their own: the configuration goes
    # with the CLI.
    folder.mkdir(parents=True, exist_ok=True)
    cli = folder / "podman"
    cli.write_text(
        f'#!/bin/sh\nexport CONTAINERS_CONF={shlex.quote(conf)}\nexec {shlex.quote(real)} "$@"\n'
    )
    cli.chmod(0o755)
    image = done.stdout.split()[-1]
    return Engine("podman", image, folder, {"CONTAINERS_CONF": conf})


def docker(folder: Path, podman_engine: Engine) -> Engine:
    """docker with the podman-built test image loaded, or a skip saying why there is none."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on this machine")
    info = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if info.returncode != 0:
        said = (info.stderr.strip() or info.stdout.strip()).splitlines()
        pytest.skip(f"no docker daemon reachable: {said[-1] if said else info.returncode}")
    engine = Engine("docker", podman_engine.image, folder, {})
    if engine("image", "inspect", engine.image, check=False).returncode != 0:
        save = f"podman save {shlex.quote(engine.image)} | docker load"
        env = {**os.environ, **podman_engine.env}
        subprocess.run(["sh", "-c", save], env=env, check=True, timeout=SETUP_TIMEOUT_S)
    return engine


def _stop(session: pytest.Session, reason: str) -> NoReturn:
    message = (
        f"the container engine cannot run here: {reason}; the container tests need it "
        "(make podman sets it up; -k 'not podman' leaves them out)"
    )
    session.shouldstop = message
    pytest.fail(message, pytrace=False)
