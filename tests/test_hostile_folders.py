"""Finding 3 of the hostile-instance review: folders at predictable paths are this user's
own or refused, and no helper run on an instance imports from its current folder."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from pytest_gpucloud.core.errors import UnsafePath
from pytest_gpucloud.core.private import private_dir
from pytest_gpucloud.transport.commands import ExecShell
from pytest_gpucloud.transport.files import pull
from tests.cloud import standin_gpus
from tests.test_providers import ONE_TEST, smi_path  # noqa: F401  (a fixture)
from tests.test_sync import Remote, remote  # noqa: F401  (a fixture)

PLANTED = "import pathlib\npathlib.Path({marker!r}).touch()\nfrom json import *\n"


def test_private_dir_makes_a_0700_folder_and_refuses_one_open_to_others(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "mine")
    assert made.stat().st_mode & 0o777 == 0o700
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(UnsafePath, match="is open to other users"):
        private_dir(tmp_path / "open")
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        private_dir(tmp_path / "link")


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a folder to another user")
def test_private_dir_refuses_another_users_folder(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to another user"):
        private_dir(theirs)


@pytest.mark.parametrize("planted", ["link", "open"])
def test_local_provider_refuses_a_lock_folder_made_first_by_someone_else(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    smi_path: str,  # noqa: F811
    planted: str,
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    folder = temp / f"pytest-gpucloud-{os.getuid()}"
    if planted == "link":
        (tmp_path / "attacker").mkdir()
        folder.symlink_to(tmp_path / "attacker")
    else:
        folder.mkdir()
        os.chmod(folder, 0o777)
    pytester.makepyfile(ONE_TEST)
    monkeypatch.setenv("PATH", smi_path)
    monkeypatch.setenv("STANDIN_NVIDIA_GPUS", standin_gpus("Tesla T4"))
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "local")
    assert result.ret != pytest.ExitCode.OK
    assert f"the folder {folder} is" in result.stdout.str() + result.stderr.str()
    if planted == "link":
        assert list((tmp_path / "attacker").iterdir()) == []


def test_no_helper_imports_a_module_planted_in_its_folder(
    remote: Remote,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The sync's receiver and the file pipe run in the remote home; a json.py there must
    # never be imported (both import json).
    marker = tmp_path / "imported"
    (remote.home / "json.py").write_text(PLANTED.format(marker=str(marker)))
    project = tmp_path / "project"
    project.mkdir()
    (project / "a.py").write_text("A = 1\n")
    remote.sync(project)
    assert not marker.exists()

    async def fetch() -> None:
        async with remote.connect() as conn:
            await pull(ExecShell(conn), "work/proj/a.py", tmp_path / "back")

    asyncio.run(fetch())
    assert (tmp_path / "back" / "a.py").read_text() == "A = 1\n"
    assert not marker.exists()
