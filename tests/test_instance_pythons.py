"""The instance's side (worker, sync receiver, data cache, file pipe) on every Python from
3.8 to 3.13: each run gives the simulated cloud's instances another interpreter, in a venv
with the newest pytest that Python takes. Older ones are refused with a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import uv

from tests.cloud import GpuRun, Sim, Store

INSTANCE_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
INSTANCE_TEST = """
import sys

import pytest


@pytest.mark.gpu("T4", data={{"weights": "s3://{bucket}/weights.bin"}})
def test_on_the_instance(gpu_artifacts, gpu_data):
    assert sys.version_info[:2] == {version}
    with open("synced.txt") as synced:
        assert synced.read() == "synced\\n"
    assert gpu_data["weights"].read_bytes() == b"w" * 1000
    (gpu_artifacts / "python.txt").write_text("%d.%d" % sys.version_info[:2])
"""


def find_python(version: str) -> str | None:
    """CPython ``version`` ("3.8") on this machine: ``pythonX.Y`` on the PATH if it runs,
    else the newest that pyenv installed."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    pyenv = sorted(root.glob(f"versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in [shutil.which(f"python{version}"), *map(str, pyenv)]:
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def instance_venv(version: str, root: Path) -> Path:
    """A venv of CPython ``version`` with pytest, made once per session; skips the test
    where that Python is not installed."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"CPython {version} is not installed here (python{version} or pyenv)")
    venv = root / f"instance-python-{version}"
    if not venv.exists():
        tool = uv.find_uv_bin()
        subprocess.run([tool, "venv", "-q", "-p", python, str(venv)], check=True)
        # --python, not VIRTUAL_ENV: under nox, UV_PYTHON names nox's own environment.
        target = ("--python", str(venv / "bin" / "python"))
        subprocess.run([tool, "pip", "install", "-q", *target, "pytest"], check=True)
    return venv


@pytest.fixture
def instance_python(
    request: pytest.FixtureRequest, sim: Sim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The simulated cloud's instances find this Python first as ``python3``."""
    version: str = request.param
    venv = instance_venv(version, tmp_path_factory.getbasetemp())
    sim.configure(extra_path=str(venv / "bin"))
    yield version
    sim.configure(extra_path=None)


@pytest.mark.parametrize("instance_python", INSTANCE_PYTHONS, indirect=True)
def test_the_instance_side_runs_on_each_python(
    instance_python: str, gpu_run: GpuRun, pytester: pytest.Pytester, store: Store
) -> None:
    store.put("weights.bin", b"w" * 1000)
    version = tuple(int(part) for part in instance_python.split("."))
    pytester.makepyfile(test_remote=INSTANCE_TEST.format(bucket=store.bucket, version=version))
    (pytester.path / "synced.txt").write_text("synced\n")
    result = gpu_run("--gpu-s3-endpoint", store.endpoint)
    result.assert_outcomes(passed=1)
    [came_home] = (pytester.path / ".gpucloud" / "artifacts").glob("*/*/python.txt")
    assert came_home.read_text() == instance_python


@pytest.mark.parametrize("instance_python", ["3.7"], indirect=True)
def test_an_older_python_on_the_instance_is_named(
    instance_python: str, gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_remote():
            pass
        """
    )
    result = gpu_run()
    result.assert_outcomes(errors=1)
    python = find_python(instance_python)
    assert python is not None
    full = subprocess.run([python, "--version"], capture_output=True, text=True).stdout.split()[1]
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_remote*",
            f"gpu-cloud: instance i-*: python3 is Python {full}, older than 3.8, the oldest the "
            "plugin runs on an instance (use an image with a newer python3)",
        ]
    )
