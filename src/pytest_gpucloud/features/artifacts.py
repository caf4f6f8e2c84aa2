"""Each remote test's ``gpu_artifacts`` folder, brought home, and uploaded to S3 if asked.

On the instance, a test's folder is ``<workspace>/.gpucloud/artifacts/<run-id>/<test>``
(``<test>``: :func:`~pytest_gpucloud.remote.fixtures.artifacts_dir_name`). After each
test that wrote there (its ``artifacts`` frame says so), and after every test whose worker
died or timed out (no frame then: the folder is looked for), the folder is copied to
``--gpu-artifacts-dir/<test>`` over the machine's SSH connection. The instance is not
trusted with this machine's files: see :mod:`pytest_gpucloud.transport.files`.

Files past ``--gpu-artifacts-max`` (per test, in name order) stay on the instance and are
named in the summary. With ``--gpu-artifacts-s3 s3://bucket/prefix``, each test's folder is
uploaded from here to ``prefix/<run-id>/<test>/`` in the background; the instance never
holds S3 credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import secrets
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_gpucloud.core.addresses import split_url
from pytest_gpucloud.core.errors import InstanceError
from pytest_gpucloud.core.private import private_dir
from pytest_gpucloud.core.units import format_size
from pytest_gpucloud.features import s3
from pytest_gpucloud.remote.fixtures import artifacts_dir_name
from pytest_gpucloud.transport.files import pull, pull_listed

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from pytest_gpucloud.machine.machine import Machine
    from pytest_gpucloud.remote.protocol import Message

SHOWN = 5  # left-behind files named per test in the summary


def new_run_id() -> str:
    """A sortable, unique name for one session's artifacts: ``20260101-120000-3f2a09``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class TestArtifacts:
    """What came home of one test's folder. ``left``: ``(name, size)`` over the size cap;
    ``skipped``: links and special files, which never travel; ``error``: why it could not
    come (entirely)."""

    nodeid: str
    path: Path
    files: int = 0
    bytes: int = 0
    left: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    s3_url: str | None = None
    upload_error: str | None = None


class ArtifactStore:
    """This session's artifacts: where they go here and in S3, and what came of each test."""

    def __init__(
        self,
        root: Path,
        run_id: str,
        *,
        max_bytes: int,
        timeout: float,
        s3_url: str | None = None,
        s3_endpoint: str | None = None,
    ) -> None:
        self.root = root
        self.run_id = run_id
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.s3_url = s3_url
        self._clients = s3.Clients(s3_endpoint) if s3_url else None
        self.results: dict[str, TestArtifacts] = {}
        self._uploads: list[asyncio.Future[None]] = []

    @property
    def remote_root(self) -> str:
        """The folder of this session's artifacts on an instance, relative to its workspace."""
        return f".gpucloud/artifacts/{self.run_id}"

    async def collect(
        self, machine: Machine, nodeid: str, frame: Message | None, *, lost: bool = False
    ) -> None:
        """Bring ``nodeid``'s folder home from ``machine``.

        ``frame``: the test's ``artifacts`` frame (None: it wrote nothing there). ``lost``:
        its worker died before it could say: the folder is looked for, and a connection
        that is gone is no news.
        """
        if not lost and (frame is None or not frame.get("files")):
            return
        if machine.conn is None or machine.shell is None or (lost and machine.conn.is_closed()):
            return
        name = artifacts_dir_name(nodeid)
        remote = posixpath.join(machine.remote_root, self.remote_root, name)
        record = TestArtifacts(nodeid, private_dir(self.root, parents=True, tighten=True) / name)
        await asyncio.to_thread(shutil.rmtree, record.path, True)  # a former run's
        listed = _listed(frame)
        if listed is None:
            pulling = pull(machine.shell, remote, record.path, max_bytes=self.max_bytes)
        else:
            pulling = pull_listed(
                machine.shell, remote, record.path, listed, max_bytes=self.max_bytes
            )
        try:
            pulled = await asyncio.wait_for(pulling, self.timeout)
        except (InstanceError, asyncio.TimeoutError) as exc:
            if not lost:
                why = str(exc) or f"it took over {self.timeout:g} s"
                record.error = f"artifacts of {nodeid} on instance {machine.id}: {why}"
                self.results[nodeid] = record
            return
        if pulled.kind == "missing" or not (pulled.files or pulled.left):
            with contextlib.suppress(OSError):
                record.path.rmdir()
            return
        record.files, record.bytes, record.left = pulled.files, pulled.bytes, pulled.left
        skipped = pulled.skipped if listed is None else _pairs(frame, "skipped")
        record.skipped = [str(name) for name, _ in skipped]
        if pulled.refused:
            names = ", ".join(name for name, _ in pulled.refused[:SHOWN])
            record.error = f"refused files instance {machine.id} sent for {nodeid}: {names}"
        self.results[nodeid] = record
        if self._clients is not None and pulled.files:
            self._uploads.append(asyncio.ensure_future(asyncio.to_thread(self._upload, record)))

    def _upload(self, record: TestArtifacts) -> None:
        assert self._clients is not None
        bucket, key_prefix = self._s3_place(record)
        url = f"s3://{bucket}/{key_prefix}/"
        try:
            client = self._clients.get()
            for path in sorted(p for p in record.path.rglob("*") if p.is_file()):
                key = f"{key_prefix}/{path.relative_to(record.path).as_posix()}"
                client.upload_file(str(path), bucket, key)
        except Exception as exc:  # boto3's, the network's or the disk's: all go to the summary
            what = f"uploading the artifacts of {record.nodeid} to {url}"
            record.upload_error = str(s3.describe(exc, what))
            return
        record.s3_url = url

    def _s3_place(self, record: TestArtifacts) -> tuple[str, str]:
        """``(bucket, key prefix)`` of ``record``'s files: ``prefix/<run-id>/<test>``."""
        assert self.s3_url is not None
        bucket, prefix = split_url(self.s3_url)
        return bucket, posixpath.join(prefix, self.run_id, record.path.name)

    async def finish(self) -> None:
        """Wait for the uploads still running."""
        if self._uploads:
            await asyncio.gather(*self._uploads, return_exceptions=True)

    def properties(self, nodeid: str) -> list[tuple[str, str]]:
        """What ``nodeid``'s report gets in ``user_properties`` (and so in junitxml)."""
        record = self.results.get(nodeid)
        if record is None:
            return []
        properties = [("gpu_artifacts", str(record.path))]
        if self.s3_url is not None and record.files:
            bucket, key_prefix = self._s3_place(record)
            properties.append(("gpu_artifacts_s3", f"s3://{bucket}/{key_prefix}/"))
        if record.left:
            properties.append(("gpu_artifacts_left_behind", self._left_text(record)))
        return properties

    def _left_text(self, record: TestArtifacts) -> str:
        cap = format_size(self.max_bytes)
        left = _some([f"{name} ({format_size(size)})" for name, size in record.left])
        return f"over --gpu-artifacts-max {cap}, left on the instance: {left}"

    def summary_lines(self, failed: Iterable[str]) -> list[tuple[str, bool]]:
        """Lines for the terminal summary, each with whether it is a warning."""
        if not self.results:
            return []
        records = list(self.results.values())
        files = sum(r.files for r in records)
        size = sum(r.bytes for r in records)
        lines = [
            (
                f"artifacts: {len(records)} test(s), {files} file(s), {format_size(size)} in "
                f"{self.root}",
                False,
            )
        ]
        lines += [
            (f"  {nodeid} (failed): {self.results[nodeid].path}", False)
            for nodeid in dict.fromkeys(failed)
            if nodeid in self.results
        ]
        uploaded = [r for r in records if r.s3_url]
        if uploaded and self.s3_url is not None:
            target = f"{self.s3_url.rstrip('/')}/{self.run_id}/"
            lines.append((f"  uploaded to {target} ({len(uploaded)} test(s))", False))
        for record in records:
            if record.left:
                lines.append((f"  {record.nodeid}: {self._left_text(record)}", True))
            if record.skipped:
                what = f"links and special files stay behind: {_some(record.skipped)}"
                lines.append((f"  {record.nodeid}: {what}", True))
            for problem in (record.error, record.upload_error):
                if problem:
                    lines.append((f"  gpu-cloud: {problem.removeprefix('gpu-cloud: ')}", True))
        return lines


def _listed(frame: Message | None) -> list[tuple[str, int]] | None:
    """The files an ``artifacts`` frame lists, if it lists them well."""
    if frame is None or not isinstance(frame.get("list"), list):
        return None
    listed = [
        (name, size) for name, size in _pairs(frame, "list") if isinstance(size, int) and size >= 0
    ]
    return listed if len(listed) == len(frame["list"]) else None


def _some(names: list[str]) -> str:
    """``a, b, c and 4 more``."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _pairs(frame: Message | None, key: str) -> list[tuple[str, object]]:
    """The well-formed ``[name, value]`` entries of a frame's list ``key``."""
    entries = frame.get(key) if frame is not None else None
    if not isinstance(entries, list):
        return []
    return [
        (entry[0], entry[1])
        for entry in entries
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
    ]
