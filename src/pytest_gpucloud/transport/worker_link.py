"""The local end of one instance's long-lived remote pytest session (``remote/worker.py``).

Read-ahead: a round trip per test would cost every test the latency of the SSH channel and
three processes' wake-ups (on a real network, a whole RTT). When the caller names the tests
that follow (``ahead``) and the last test was quick (under ``READ_AHEAD_BELOW_S``), their
``run`` frames go out before this test's results are in, up to ``READ_AHEAD`` of them; the
worker runs them back to back and their results wait in the channel until asked for. Runs
asked for out of that order are still right: the runs in flight are first taken and
dropped (they ran, as xdist's pre-sent tests do). Slow tests are never read ahead of, so
an interrupted session makes the worker run at most a few quick tests more.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, TypedDict, TypeVar

from pytest_gpucloud.core.errors import RemoteError, TimeLimitExceeded
from pytest_gpucloud.core.escape import visible
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.remote import source
from pytest_gpucloud.remote.boot import GO, PROBE_ENV
from pytest_gpucloud.remote.protocol import (
    PROTOCOL_VERSION,
    TIMEOUT_EXIT,
    Message,
    decode,
    encode,
)
from pytest_gpucloud.transport.commands import Process, Shell

REMOTE_PACKAGE = "gpucloud_remote"
#: The oldest pytest on an instance whose reports this side replays (and the plugin's own).
OLDEST_REMOTE_PYTEST = (8, 0)
_CHUNK = 256 * 1024
FRAME_MAX = 64 << 20  # one frame: a report with its captured output, tracebacks, sections
# How much longer than a test's time limit this side waits for the worker to stop itself.
TIMEOUT_GRACE_S = 5.0
READ_AHEAD = 8
READ_AHEAD_BELOW_S = 0.05
_T = TypeVar("_T")


class WorkerStart(TypedDict):
    """The worker's ``start`` frame: its pytest arguments (the files to collect last), the
    plugin's options and ini keys it accepts and ignores, the environment it adds, and where
    a test's artifacts go."""

    args: list[str]
    options: list[dict[str, object]]  # {"name": flag, "takes_value": bool}
    ini: list[str]
    environ: dict[str, str]
    artifacts: str
    coverage: dict[str, Any] | None  # --cov: what to measure (remote/measure.py)
    live_output: bool  # -s: the tests' output comes as it is made
    plugin_options: dict[str, str]  # the options forwarded for other plugins -> package


@dataclass(frozen=True)
class RunSpec:
    """One ``run`` frame: the test, the test after it on this worker, its limit and env,
    and its datasets (presigned, see features/data.py)."""

    nodeid: str
    nextid: str | None
    timeout: float
    env: dict[str, str] = field(default_factory=dict, repr=False)  # values are never shown
    data: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> bytes:
        extra = {"data": self.data} if self.data else {}
        return encode(
            "run",
            nodeid=self.nodeid,
            nextid=self.nextid,
            timeout=self.timeout,
            env=self.env,
            **extra,
        )


@dataclass
class TestRun:
    """What the worker sent back for one test: serialized reports and warnings, in order."""

    nodeid: str
    reports: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Message] = field(default_factory=list)
    missing: bool = False
    seconds: float = 0.0  # how long the caller waited for it (less when read ahead)
    artifacts: Message | None = None  # its ``artifacts`` frame: it wrote to gpu_artifacts
    data: list[Message] = field(default_factory=list)  # its ``data`` frames


@dataclass
class Collection:
    """What the worker sent back before its first test."""

    hello: Message
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Message] = field(default_factory=list)
    count: int = 0
    collect_s: float = 0.0  # from the go to ``collected``


class _Frames:
    """Splits the worker's stdout into frames; reads in large chunks, not line by line. A
    frame longer than :data:`FRAME_MAX` is refused: nothing else bounds the buffer."""

    def __init__(self, stream: asyncssh.SSHReader[bytes]) -> None:
        self._stream = stream
        self._partial: list[bytes] = []  # the frame begun, in pieces (joined once, at its end)
        self._partial_size = 0
        self._ready: collections.deque[bytes] = collections.deque()

    async def next(self) -> Message | None:
        while not self._ready:
            chunk = await self._stream.read(_CHUNK)
            if not chunk:
                return None
            *lines, rest = chunk.split(b"\n")
            if lines:
                lines[0] = b"".join([*self._partial, lines[0]])
                self._partial.clear()
                self._partial_size = 0
                self._ready.extend(lines)
            if rest:
                self._partial.append(rest)
                self._partial_size += len(rest)
                if self._partial_size > FRAME_MAX:
                    raise ValueError(f"a frame longer than {FRAME_MAX >> 20} MiB")
        return decode(self._ready.popleft())


class WorkerLink:
    def __init__(
        self,
        instance_id: str,
        process: Process,
        echo: Callable[[bytes], None] | None = None,
    ) -> None:
        self.instance_id = instance_id
        self._process = process
        self._echo = echo
        self._frames = _Frames(process.stdout)
        self._stderr: collections.deque[bytes] = collections.deque(maxlen=60)
        self._drain = asyncio.ensure_future(self._drain_stderr())
        # Runs sent whose results were not taken yet, in the worker's order.
        self._in_flight: collections.deque[RunSpec] = collections.deque()
        self._quick = False  # the last test ran quickly enough to read ahead of the next
        self.start_s = 0.0  # from the exec to pytest imported (``loaded``)
        self.probe: str | None = None  # what the launch's ``probe`` printed, ``exit N`` last
        self.coverage: str | None = None  # the ``coverage`` frame's data, after close()

    @classmethod
    async def launch(
        cls,
        shell: Shell,
        instance_id: str,
        *,
        workspace: str,
        package_dir: str,
        timeout: float,
        wrap: Callable[[str], str] | None = None,
        probe: str | None = None,
        echo: Callable[[bytes], None] | None = None,
    ) -> WorkerLink:
        """Start the worker's bootstrap (``remote/boot.py``) in ``workspace`` and wait until
        it has imported pytest; the code sync may still be running. :meth:`begin` it once
        the workspace is complete.

        ``wrap``: turns the worker's shell command line into the one to run (a container
        runtime's, see :meth:`pytest_gpucloud.machine.runtime.Runtime.wrap`). ``probe``: a
        shell command run first in the same exec (the login shell is paid once); its output
        (stderr included) and exit status come back as :attr:`probe`. ``echo``: called
        with the worker's stderr as it comes (the tests' own output, with a ``live_output``
        start).
        """
        command = (
            f"cd {shlex.quote(workspace)} && PYTHONPATH={shlex.quote(package_dir)} "
            f"exec python3 -c {shlex.quote(source('boot'))}"
        )
        if probe is not None:
            said = f'p=$( {{ {probe} ; }} 2>&1; echo "exit $?" ); export {PROBE_ENV}="$p"'
            command = f"{said}; {command}"
        if wrap is not None:
            command = wrap(command)
        started = time.perf_counter()
        process = await shell.create_process(command)
        link = cls(instance_id, process, echo)
        await link._within(link._loaded(), timeout, "did not start")
        link.start_s = time.perf_counter() - started
        return link

    async def begin(self, start: WorkerStart, timeout: float) -> Collection:
        """Let the launched worker run from the complete workspace, send it ``start`` and
        wait until it has collected."""
        return await self._within(self._handshake(start), timeout, "did not finish collecting")

    async def _within(self, step: Awaitable[_T], timeout: float, failed: str) -> _T:
        try:
            return await asyncio.wait_for(step, timeout)
        except asyncio.TimeoutError:
            self.kill()
            raise RemoteError(
                f"the remote worker on instance {self.instance_id} {failed} within {timeout:g} s"
            ) from None
        except BaseException:
            self.kill()
            raise

    async def _loaded(self) -> None:
        frame = await self._expect_frame("starting")
        if frame.get("type") != "loaded":
            raise self._lost("starting", f"first frame was {frame.get('type')!r}")
        probe = frame.get("probe")
        self.probe = probe if isinstance(probe, str) else None

    async def _handshake(self, start: WorkerStart) -> Collection:
        started = time.perf_counter()
        await self._send(GO)
        hello = await self._expect_frame("starting")
        if hello.get("type") != "hello":
            raise self._lost("starting", f"first frame was {hello.get('type')!r}")
        _check_versions(hello, self.instance_id)
        collection = Collection(hello=hello)
        await self._send(encode("start", **start))
        while True:
            frame = await self._expect_frame("collecting")
            kind = frame["type"]
            if kind == "collected":
                collection.count = int(frame.get("count", 0))
                collection.collect_s = time.perf_counter() - started
                return collection
            if kind == "collectreport":
                collection.errors.append(frame["report"])
            elif kind == "warning":
                collection.warnings.append(frame)
            elif kind == "crashed":
                raise self._lost("collecting", str(frame.get("message", "")))

    async def run(
        self,
        nodeid: str,
        nextid: str | None,
        timeout: float,
        env: dict[str, str] | None = None,
        ahead: Sequence[RunSpec] = (),
        data: dict[str, Any] | None = None,
    ) -> TestRun:
        """Run one test; raise RemoteError if the worker dies or the test outlives ``timeout``.

        ``env``: environment variables for this test; their values travel in the run frame
        only. The worker stops itself at ``timeout``; if it cannot, this side gives up on it
        a little later. ``ahead``: the runs expected next on this worker, in order, which
        may be sent now (see the module docstring). ``data``: the test's datasets.
        """
        started = time.perf_counter()
        spec = RunSpec(nodeid, nextid, timeout, env or {}, data or {})
        if self._in_flight and self._in_flight[0] != spec:
            await self._drop_in_flight()
        if not self._in_flight:
            await self._send(spec.frame())
            self._in_flight.append(spec)
        if self._quick and ahead:
            await self._send_ahead(ahead)
        run = await self._result(spec)
        run.seconds = time.perf_counter() - started
        self._quick = sum(r.get("duration", 0.0) for r in run.reports) < READ_AHEAD_BELOW_S
        return run

    async def _send_ahead(self, ahead: Sequence[RunSpec]) -> None:
        # Topped up when half the window is left, in one write: one SSH packet per
        # READ_AHEAD / 2 tests rather than one per test.
        sent = list(self._in_flight)[1:]
        if len(sent) > READ_AHEAD // 2 or list(ahead[: len(sent)]) != sent:
            return  # (or the caller's plan changed: what is in flight is dropped when reached)
        more = ahead[len(sent) : READ_AHEAD]
        if more:
            await self._send(b"".join(spec.frame() for spec in more))
            self._in_flight.extend(more)

    async def _drop_in_flight(self) -> None:
        """Take and drop the results of runs sent ahead that the caller did not ask for."""
        while self._in_flight:
            await self._result(self._in_flight[0])

    async def _result(self, spec: RunSpec) -> TestRun:
        """The results of the oldest run in flight, ``spec``."""
        run = TestRun(spec.nodeid)
        try:
            return await asyncio.wait_for(self._collect_run(run), spec.timeout + TIMEOUT_GRACE_S)
        except asyncio.TimeoutError:
            self.kill()
            raise self._timed_out(run, spec.timeout) from None
        except RemoteError:
            if self._process.exit_status == TIMEOUT_EXIT:
                raise self._timed_out(run, spec.timeout) from None
            raise
        finally:
            self._in_flight.popleft()

    def _timed_out(self, run: TestRun, timeout: float) -> TimeLimitExceeded:
        return TimeLimitExceeded(
            f"{run.nodeid} exceeded its time limit of {timeout:g} s on instance "
            f"{self.instance_id}; the remote worker was stopped (raise the limit with "
            f"--gpu-timeout or gpu(timeout=...)){self._last_output()}",
            run.reports,
        )

    async def _collect_run(self, run: TestRun) -> TestRun:
        nodeid = run.nodeid
        while True:
            frame = await self._expect_frame(f"running {nodeid}")
            kind = frame["type"]
            if kind == "report":
                run.reports.append(frame["report"])
            elif kind == "warning":
                run.warnings.append(frame)
            elif kind == "artifacts":
                run.artifacts = frame
            elif kind == "data":
                run.data.append(frame)
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
                await self._send(encode("shutdown", skip_waiting=True))
                self._process.stdin.write_eof()
                await asyncio.wait_for(self._last_frames(), timeout)
            except (asyncio.TimeoutError, OSError, ValueError, asyncssh.Error, RemoteError):
                self.kill()
        self._drain.cancel()

    async def _last_frames(self) -> None:
        """Read to the end: results sent ahead are dropped, the coverage data is kept."""
        while (frame := await self._frames.next()) is not None:
            if frame["type"] == "coverage":
                self.coverage = str(frame["data"])
        await self._process.wait_closed()

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
            self.kill()
            raise self._lost(doing, f"garbled output ({exc})") from None
        if frame is None:
            await asyncio.sleep(0.05)  # let the exit status arrive
            raise self._lost(doing, self._how_it_ended())
        return frame

    def _how_it_ended(self) -> str:
        if self._process.exit_signal is not None:
            return f"it was killed by SIG{self._process.exit_signal[0]}"
        status = self._process.exit_status
        return "it exited" if status is None else f"exit status {status}"

    def _lost(self, doing: str, why: str) -> RemoteError:
        return RemoteError(
            f"the remote worker on instance {self.instance_id} stopped while {doing}: "
            f"{why}{self._last_output()}"
        )

    def _last_output(self) -> str:
        text = visible(b"".join(self._stderr).decode(errors="replace"))
        tail = text.strip().splitlines()[-8:]
        return ("; its last output:\n" + "\n".join(tail)) if tail else ""

    async def _drain_stderr(self) -> None:
        # The worker's own terminal output goes to stderr; keep reading it so it never
        # blocks, and keep its tail for error messages.
        stream = self._process.stderr
        while True:
            chunk = await stream.read(_CHUNK)
            if not chunk:
                return
            if self._echo is not None:
                self._echo(chunk)
            for line in chunk.splitlines(keepends=True):
                self._stderr.append(line)


def _check_versions(hello: Message, instance_id: str) -> None:
    remote_protocol = hello.get("protocol")
    remote_pytest = str(hello.get("pytest", "?"))
    local_pytest = version("pytest")  # read, not imported: transport knows no pytest
    if remote_protocol != PROTOCOL_VERSION:
        raise RemoteError(
            f"instance {instance_id}: remote worker speaks protocol {remote_protocol}, this "
            f"plugin speaks {PROTOCOL_VERSION}"
        )
    if not _replayable(remote_pytest):
        raise RemoteError(
            f"instance {instance_id}: pytest {remote_pytest} on the instance (Python "
            f"{hello.get('python')}) cannot replay into pytest {local_pytest} here; "
            f"install pytest {OLDEST_REMOTE_PYTEST[0]}.{OLDEST_REMOTE_PYTEST[1]} or newer in "
            "the image or via --gpu-setup"
        )


def _replayable(remote_pytest: str) -> bool:
    """Whether reports of that pytest replay here: pytest 8 and 9 serialize them alike (the
    instance's Python decides which one it can have: 3.8 and 3.9 stop at pytest 8)."""
    found = re.match(r"(\d+)\.(\d+)", remote_pytest)
    return found is not None and (int(found[1]), int(found[2])) >= OLDEST_REMOTE_PYTEST


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
