"""The fixtures a remote test gets from this plugin: ``gpu_artifacts`` and ``gpu_data``
(and ``gpu_cloud``, which only says that it lives in the local session).

``gpu_artifacts`` is the test's own folder below the ``start`` frame's ``artifacts`` root
(in the workspace's ``.gpucloud/``: never synced over, seen inside a container, and left in
place when the worker dies, so the local side can still fetch it). ``gpu_data`` fetches the
datasets of the test's ``run`` frame (``datacache.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from .datacache import DataError, fetch
from .filepipe import walk

if TYPE_CHECKING:
    from .protocol import Message

PREFIX = "gpu-cloud: "
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def artifacts_dir_name(nodeid: str) -> str:
    """A test's folder name, here and on the local side: its nodeid with anything but
    ASCII letters, digits, ``._-`` made ``_``, cut to 100 characters, and a hash of the
    whole nodeid, so that no two tests share a folder."""
    readable = _UNSAFE.sub("_", nodeid).strip("._")[:100]
    return f"{readable}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"


class Frames(Protocol):
    """Where the fixtures queue their frames (the worker's channel)."""

    def queue(self, kind: str, **fields: Any) -> None: ...


class GpuFixtures:
    """Registered into the remote session beside the worker plugin."""

    def __init__(self, channel: Frames, artifacts: str | None) -> None:
        self._channel = channel
        # The worker starts in the workspace; a test may change directory later.
        self._artifacts = os.path.abspath(artifacts) if artifacts else None
        self._data_cache = os.path.abspath(os.path.join(".gpucloud", "data"))
        self._frame: Message = {}
        self._made: Path | None = None

    def begin(self, frame: Message) -> None:
        """A ``run`` frame arrived: its test is next."""
        self._frame = frame
        self._made = None

    def end(self) -> None:
        """Its test is over: queue an ``artifacts`` frame if it wrote any (it travels with
        the test's ``done``), with the list of its files, so the local side can fetch them
        with the instance's own ``tar``."""
        if self._made is None:
            return
        _, files, skipped = walk(str(self._made))
        self._channel.queue(
            "artifacts",
            nodeid=self._frame["nodeid"],
            path=str(self._made),
            files=len(files),
            bytes=sum(f[2] for f in files),
            list=[[f[0], f[2]] for f in files],
            skipped=skipped,
        )

    @pytest.fixture
    def gpu_artifacts(self) -> Path:
        """A fresh folder for this test's files: whatever it holds after the test comes back
        to the local machine (``--gpu-artifacts-dir``), also when the test fails or its
        worker dies."""
        if self._artifacts is None:
            pytest.fail(f"{PREFIX}the local side sent no artifacts folder", pytrace=False)
        path = Path(self._artifacts, artifacts_dir_name(self._frame["nodeid"]))
        shutil.rmtree(path, ignore_errors=True)  # left by an earlier run of the same test
        path.mkdir(parents=True)
        self._made = path
        return path

    @pytest.fixture(scope="session")
    def gpu_cloud(self) -> None:
        """Lives in the local session only: say so rather than 'fixture not found'."""
        pytest.fail(
            f"{PREFIX}the gpu_cloud fixture lives in the local session (it is the fleet of "
            "instances), not on an instance, where gpu-marked tests run: use it in an unmarked "
            "test or fixture",
            pytrace=False,
        )

    @pytest.fixture
    def gpu_data(self) -> dict[str, Path]:
        """The datasets of the test's ``gpu(data={...})``: name -> local path on the instance
        (the object's file, or the folder of a prefix), fetched once per instance."""
        nodeid = self._frame.get("nodeid", "")
        paths: dict[str, Path] = {}
        specs: dict[str, Any] = self._frame.get("data") or {}
        for name, spec in specs.items():
            try:
                path, cached, total = fetch(spec, self._data_cache)
            except (DataError, OSError) as exc:
                pytest.fail(f"{PREFIX}{nodeid}: data {name!r}: {exc}", pytrace=False)
            self._channel.queue(
                "data", nodeid=nodeid, name=name, path=path, cached=cached, bytes=total
            )
            paths[name] = Path(path)
        return paths
