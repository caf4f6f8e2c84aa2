"""Finding 0 of the hostile-instance review: an option's path value taken by pytest for a
test path widens the rootdir, and the sync would send that wider tree (a private key in a
sibling folder reached the instance)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_gpucloud.config.rootdir import project_root
from tests.cloud import GpuRun

LISTS_WORKSPACE = """
import pathlib

import pytest


@pytest.mark.gpu("T4")
def test_workspace():
    names = sorted(str(p) for p in pathlib.Path.cwd().rglob("*"))
    assert not any("client_key" in name for name in names), names
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``proj/`` with a gpu test, beside ``keys/client_key``; pytest runs in ``proj/``."""
    keys = pytester.path / "keys"
    keys.mkdir()
    (keys / "client_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ncanary\n")
    proj = pytester.mkdir("proj")
    (proj / "test_ws.py").write_text(LISTS_WORKSPACE)
    monkeypatch.chdir(proj)
    return proj


def test_spaced_key_path_refused_with_the_fix(project: Path, gpu_run: GpuRun) -> None:
    before = len(gpu_run.sim.instances())
    result = gpu_run("--gpu-ssh-key", "../keys/client_key")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*gpu-cloud: --gpu-ssh-key ../keys/client_key*--gpu-ssh-key=../keys/client_key*"]
    )
    assert len(gpu_run.sim.instances()) == before


def test_equals_form_runs(project: Path, gpu_run: GpuRun) -> None:
    result = gpu_run("--gpu-ssh-key=../keys/client_key", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_rootdir_widened_by_another_plugins_option_refused(
    project: Path, pytester: pytest.Pytester, gpu_run: GpuRun
) -> None:
    # Another plugin's option, unknown when pytest chooses the rootdir: only the comparison
    # of rootdirs can catch it.
    (project / "myplug.py").write_text(
        "def pytest_addoption(parser):\n    parser.addoption('--my-dir')\n"
    )
    pytester.syspathinsert(project)
    result = gpu_run("-p", "myplug", "--my-dir", "../keys")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gpu-cloud: the rootdir * is not the one the test paths give*"])


def test_rootdir_above_the_git_top_level_refused(
    pytester: pytest.Pytester, gpu_run: GpuRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = pytester.mkdir("repo")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "test_ws.py").write_text(LISTS_WORKSPACE)
    (pytester.path / "keys").mkdir()
    (pytester.path / "keys" / "client_key").write_text("secret")
    monkeypatch.chdir(repo)
    result = gpu_run(f"--rootdir={pytester.path}", "test_ws.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gpu-cloud: the rootdir * lies above the project's root*repo*"])


def test_project_root_is_the_ini_folder_outside_git(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    assert project_root(tmp_path, tmp_path / "pytest.ini", tmp_path) == tmp_path
