"""The local end of one instance's long-lived remote pytest session (``remote/worker.py``)."""

from __future__ import annotations

import asyncio
import collections
import shlex
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import pytest

from pytest_gpucloud.errors import RemoteError
from pytest_gpucloud.remote.protocol import PROTOCOL_VERSION, Message, decode, encode

REMOTE_PACKAGE = "gpucloud_remote"
_CHUNK = 256 * 1024


@dataclass
class TestRun:
    """What the worker sent back for one test: serialized reports and warnings, in order."""

    nodeid: str
    reports: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Message] = field(default_factory=list)
    missing: bool = False


@dataclass
class Collection:
    """What the worker sent back before its first test."""

    hello: Message
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Message] = field(default_factory=list)
    count: int = 0


class _Frames:
    """Splits the worker's stdout into frames; reads in large chunks, not line by line."""

    def __init__(self, stream: asyncssh.SSHReader[bytes]) -> None:
        self._stream = stream
        self._buffer = b""
        self._ready: collections.deque[bytes] = collections.deque()

    async def next(self) -> Message | None:
        while not self._ready:
            chunk = await self._stream.read(_CHUNK)
            if not chunk:
                return None
            *lines, self._buffer = (self._buffer + chunk).split(b"\n")
            self._ready.extend(lines)
        return decode(self._ready.popleft())


class WorkerLink:
    def __init__(self, instance_id: str, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self.instance_id = instance_id
        self._process = process
        self._frames = _Frames(process.stdout)
        self._stderr: collections.deque[bytes] = collections.deque(maxlen=60)
        self._drain = asyncio.ensure_future(self._drain_stderr())

    @classmethod
    async def start(
        cls,
        conn: asyncssh.SSHClientConnection,
        instance_id: str,
        *,
        workspace: str,
        package_dir: str,
        start: Message,
        timeout: float,
    ) -> tuple[WorkerLink, Collection]:
        """Start the worker in ``workspace`` and wait until it has collected."""
        command = (
            f"cd {shlex.quote(workspace)} && PYTHONPATH={shlex.quote(package_dir)} "
            f"exec python3 -m {REMOTE_PACKAGE}"
        )
        process = await conn.create_process(command, encoding=None)
        link = cls(instance_id, process)
        try:
            collection = await asyncio.wait_for(link._handshake(start), timeout)
        except asyncio.TimeoutError:
            link.kill()
            raise RemoteError(
                f"the remote worker on instance {instance_id} did not finish collecting "
                f"within {timeout:g} s"
            ) from None
        except BaseException:
            link.kill()
            raise
        return link, collection

    async def _handshake(self, start: Message) -> Collection:
        hello = await self._expect_frame("starting")
        if hello.get("type") != "hello":
            raise self._lost("starting", f"first frame was {hello.get('type')!r}")
        _check_versions(hello, self.instance_id)
        await self._send(encode("start", **start))
        collection = Collection(hello=hello)
        while True:
            frame = await self._expect_frame("collecting")
            kind = frame["type"]
            if kind == "collected":
                collection.count = int(frame.get("count", 0))
                return collection
            if kind == "collectreport":
                collection.errors.append(frame["report"])
            elif kind == "warning":
                collection.warnings.append(frame)
            elif kind == "crashed":
                raise self._lost("collecting", str(frame.get("message", "")))

    async def run(self, nodeid: str, nextid: str | None, timeout: float) -> TestRun:
        """Run one test; raise RemoteError if the worker dies or the test outlives ``timeout``."""
        await self._send(encode("run", nodeid=nodeid, nextid=nextid))
        try:
            return await asyncio.wait_for(self._collect_run(nodeid), timeout)
        except asyncio.TimeoutError:
            self.kill()
            raise RemoteError(
                f"{nodeid} exceeded its time limit of {timeout:g} s on instance "
                f"{self.instance_id}; the remote worker was stopped (raise it with "
                "--gpu-timeout or gpu(timeout=...))"
            ) from None

    async def _collect_run(self, nodeid: str) -> TestRun:
        run = TestRun(nodeid)
        while True:
            frame = await self._expect_frame(f"running {nodeid}")
            kind = frame["type"]
            if kind == "report":
                run.reports.append(frame["report"])
            elif kind == "warning":
                run.warnings.append(frame)
            elif kind == "done":
                return run
            elif kind == "missing":
                run.missing = True
                return run
            elif kind == "crashed":
                raise self._lost(f"running {nodeid}", str(frame.get("message", "")))

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to finish its session (session fixtures torn down), then wait."""
        if self._process.exit_status is None:
            try:
                await self._send(encode("shutdown"))
                self._process.stdin.write_eof()
                await asyncio.wait_for(self._process.wait_closed(), timeout)
            except (asyncio.TimeoutError, OSError, asyncssh.Error, RemoteError):
                self.kill()
        self._drain.cancel()

    def kill(self) -> None:
        self._process.close()
        self._drain.cancel()

    async def _send(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
            await self._process.stdin.drain()
        except (OSError, asyncssh.Error, BrokenPipeError) as exc:
            raise self._lost("receiving a command", type(exc).__name__) from None

    async def _expect_frame(self, doing: str) -> Message:
        try:
            frame = await self._frames.next()
        except (OSError, asyncssh.Error) as exc:
            raise self._lost(doing, f"SSH connection lost ({_first_line(exc)})") from None
        except ValueError as exc:
            raise self._lost(doing, f"garbled output ({exc})") from None
        if frame is None:
            await asyncio.sleep(0.05)  # let the exit status arrive
            status = self._process.exit_status
            raise self._lost(doing, "it exited" if status is None else f"exit status {status}")
        return frame

    def _lost(self, doing: str, why: str) -> RemoteError:
        tail = b"".join(self._stderr).decode(errors="replace").strip().splitlines()[-8:]
        shown = ("; its last output:\n" + "\n".join(tail)) if tail else ""
        return RemoteError(
            f"the remote worker on instance {self.instance_id} stopped while {doing}: {why}{shown}"
        )

    async def _drain_stderr(self) -> None:
        # The worker's own terminal output goes to stderr; keep reading it so it never
        # blocks, and keep its tail for error messages.
        stream = self._process.stderr
        while True:
            chunk = await stream.read(_CHUNK)
            if not chunk:
                return
            for line in chunk.splitlines(keepends=True):
                self._stderr.append(line)


def _check_versions(hello: Message, instance_id: str) -> None:
    remote_protocol = hello.get("protocol")
    remote_pytest = str(hello.get("pytest", "?"))
    if remote_protocol != PROTOCOL_VERSION:
        raise RemoteError(
            f"instance {instance_id}: remote worker speaks protocol {remote_protocol}, this "
            f"plugin speaks {PROTOCOL_VERSION}"
        )
    if remote_pytest.split(".")[0] != pytest.__version__.split(".")[0]:
        raise RemoteError(
            f"instance {instance_id}: pytest {remote_pytest} on the instance (Python "
            f"{hello.get('python')}) cannot replay into pytest {pytest.__version__} here; "
            "install the same major pytest version in the image or via --gpu-setup"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
