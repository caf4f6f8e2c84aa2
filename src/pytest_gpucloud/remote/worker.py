"""The long-lived remote pytest session.

Started on the instance by the bootstrap (``boot.py``) as the package's ``__main__`` (cwd:
the synced workspace), once the code sync is complete. It speaks the frames of
:mod:`.protocol` over its original stdin/stdout, collects once, then runs the tests the
local side asks for, one ``run`` frame at a time, keeping module and session fixtures alive
between consecutive tests exactly as the local ``nextitem`` would.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import platform
import select
import shutil
import sys
import tempfile
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, BinaryIO

import pytest

from .fixtures import GpuFixtures
from .measure import Measurement
from .protocol import PROTOCOL_VERSION, TIMEOUT_EXIT, Message, decode, encode

if TYPE_CHECKING:
    import warnings
    from collections.abc import Callable, Generator, Iterator

GPU_MARKER = "gpu(spec=None, *, count=1, vram=None, image=None, timeout=None, env=(), data=None): "
GPU_MARKER += "run this test on a cloud GPU instance (pytest-gpucloud)"

STACK_SHOWN = 6  # innermost frames of a test that outlived its time limit

# The local plugin must not load again on the instance, whatever name it was loaded by.
BLOCKED = ["-p", "no:gpucloud", "-p", "no:pytest_gpucloud.plugin"]


class Channel:
    """The frame channel: private copies of the process's original stdin and stdout, and
    of its stderr for the worker's own last words (pytest's capture takes fd 2 in tests)."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, stderr: BinaryIO) -> None:
        self._reader = reader  # read through its fd, unbuffered: see shutdown_waiting
        self._writer = writer
        self.stderr = stderr
        self._frames: collections.deque[Message] = collections.deque()
        self._partial = b""
        self._eof = False

    @classmethod
    def from_stdio(cls) -> Channel:
        """Take fds 0 and 1 for the channel; leave /dev/null on 0 and stderr on 1.

        pytest's capture, a test's ``print`` or a child process can then neither read
        frames meant for the worker nor write into the channel.
        """
        reader = os.fdopen(os.dup(0), "rb")
        writer = os.fdopen(os.dup(1), "wb")
        stderr = os.fdopen(os.dup(2), "wb")
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        return cls(reader, writer, stderr)

    def send(self, kind: str, **fields: Any) -> None:
        """Write a frame and flush it, with those queued before it."""
        self.queue(kind, **fields)
        self.flush()

    def flush(self) -> None:
        """Send the frames queued so far."""
        self._writer.flush()

    def queue(self, kind: str, **fields: Any) -> None:
        """Write a frame that goes out with the next :meth:`send`: a test's reports travel
        with its ``done``, in one write instead of four."""
        self._writer.write(encode(kind, **fields))

    def recv(self) -> Message | None:
        """The next frame, or None at EOF."""
        while not self._frames and self._read(wait=True):
            pass
        return self._frames.popleft() if self._frames else None

    def shutdown_waiting(self) -> bool:
        """Whether a ``shutdown`` with ``skip_waiting`` already waits behind the frames not
        served yet. The local side sends the runs of quick tests ahead of their turn; those
        it no longer wants when it ends the session are skipped."""
        self._read(wait=False)
        return any(f["type"] == "shutdown" and f.get("skip_waiting") for f in self._frames)

    def _read(self, *, wait: bool) -> bool:
        """Take in what has arrived (``wait``: block until something has); False at EOF."""
        if self._eof:
            return False
        fd = self._reader.fileno()
        if not wait and not select.select([fd], [], [], 0)[0]:
            return True
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            self._eof = True
            lines = [self._partial] if self._partial else []  # a torn last frame raises
        else:
            *lines, self._partial = (self._partial + chunk).split(b"\n")
        self._frames.extend(decode(line) for line in lines)
        return bool(chunk)


class Watchdog:
    """Stops the worker if a test outlives its run frame's ``timeout``: the test may never
    give control back, so a thread says where it hangs and ends the process.

    One thread for the whole session, armed per test. It sleeps until the deadline it knows
    of and is woken only for a nearer one, not for every test: a thread started per test
    cost as much as the trivial test itself (bench/results.md).
    """

    def __init__(self, stream: BinaryIO, flush: Callable[[], None]) -> None:
        self._stream = stream
        # sends the frames queued so far (the phases that ended), so the local side reports
        # the time limit in the phase the test was in
        self._flush = flush
        self._cond = threading.Condition()
        self._armed: tuple[float, str, float] | None = None  # deadline, nodeid, seconds
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, nodeid: str, frame: Message) -> Iterator[None]:
        seconds = frame.get("timeout")
        if seconds is None:
            yield
            return
        deadline = time.monotonic() + seconds
        with self._cond:
            self._armed = (deadline, nodeid, seconds)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True)
                self._thread.start()
            elif deadline < self._wake_at:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._armed = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                armed, now = self._armed, time.monotonic()
                if armed is not None and now >= armed[0]:
                    self._expire(*armed[1:])
                self._wake_at = armed[0] if armed is not None else math.inf
                self._cond.wait(None if armed is None else self._wake_at - now)

    def _expire(self, nodeid: str, seconds: float) -> None:
        where = sys._current_frames().get(threading.main_thread().ident or 0)
        stack = traceback.format_stack(where)[-STACK_SHOWN:] if where else []
        self._stream.write(
            f"{nodeid} exceeded its time limit of {seconds:g} s; it was at:\n".encode()
            + "".join(stack).encode(errors="replace")
        )
        self._stream.flush()
        with contextlib.suppress(OSError, ValueError):
            self._flush()
        os._exit(TIMEOUT_EXIT)


class WorkerPlugin:
    """Registered into the remote session: serves ``run`` frames from pytest_runtestloop."""

    def __init__(self, channel: Channel, start: Message) -> None:
        self._channel = channel
        self._watchdog = Watchdog(channel.stderr, channel.flush)
        self.fixtures = GpuFixtures(channel, start.get("artifacts"))
        self._options: list[dict[str, Any]] = start.get("options", [])
        self._ini: list[str] = start.get("ini", [])
        self._config: pytest.Config | None = None
        # nodeid of a collector or deselected item -> why its tests are not here
        self._uncollected: dict[str, str] = {}
        # The tests' own output goes to stderr as it comes, the terminal's nowhere (``-s``).
        self._live_output = bool(start.get("live_output"))
        # option -> the package it comes from, for options the local session forwards
        self._plugin_options: dict[str, str] = start.get("plugin_options", {})
        self._stdout: Any = None
        self.collected = False
        self.crashed = False

    def crash(self, message: str) -> None:
        """Send ``crashed`` once; the local side may already be gone."""
        if self.crashed:
            return
        self.crashed = True
        with contextlib.suppress(OSError):
            self._channel.send("crashed", message=message)

    def pytest_addoption(self, parser: pytest.Parser) -> None:
        group = parser.getgroup("gpu-cloud", "pytest-gpucloud (inert on the instance)")
        for option in self._options:
            action = "store" if option.get("takes_value") else "store_true"
            group.addoption(option["name"], action=action, help="ignored on the instance")
        for name in self._ini:
            parser.addini(name, help="ignored on the instance")

    @contextlib.contextmanager
    def _crash_on_error(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # pytest prints it to stderr; the local side gets it too
            why = self._missing_plugin(str(exc)) or str(exc)
            self.crash(f"remote pytest {'failed' if self.collected else 'could not start'}: {why}")
            raise

    def _missing_plugin(self, error: str) -> str | None:
        """An option the local session forwarded is unknown here: which package it needs."""
        _, found, unknown = error.rpartition("unrecognized arguments: ")
        for arg in unknown.split() if found else []:
            package = self._plugin_options.get(arg.split("=")[0])
            if package is not None:
                return (
                    f"{arg} needs {package} on the instance, as here; install it in the "
                    "image or with --gpu-setup"
                )
        return None

    @pytest.hookimpl(wrapper=True)
    def pytest_cmdline_parse(self) -> Generator[None, pytest.Config, pytest.Config]:
        # Bad arguments or ini values, a conftest that does not import.
        with self._crash_on_error():
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_cmdline_main(self) -> Generator[None, int | pytest.ExitCode, int | pytest.ExitCode]:
        # Usage errors of configure and collection (a file that is not there), and a
        # fixture whose teardown fails when the session ends after ``shutdown``.
        with self._crash_on_error():
            return (yield)

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        self._config = config
        config.addinivalue_line("markers", GPU_MARKER)
        # An ini addopts may ask for these; only the local session writes the junitxml,
        # and the instance runs one process (the local side does the distribution).
        config.option.xmlpath = None
        if getattr(config.option, "dist", "no") != "no":
            config.option.dist = "no"
        # No one could type into a debugger here (stdin is /dev/null); the local side says so.
        config.option.usepdb = config.option.trace = False
        if self._live_output:  # the terminal reporter, made next, writes to this file
            if isinstance(sys.stdout, io.TextIOWrapper):  # a test's prints go out as made
                sys.stdout.reconfigure(line_buffering=True)
            self._stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self) -> None:
        if self._stdout is not None:
            sys.stdout, self._stdout = self._stdout, None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # The local side may run a test other than the ``nextid`` it named last (a test
        # that shares this instance, another xdist worker's): tear down what the previous
        # test kept for that one and this one does not need. A no-op when it came as named;
        # a failing teardown is this test's setup error.
        item.session._setupstate.teardown_exact(item)

    def _serialize(self, report: pytest.TestReport | pytest.CollectReport) -> dict[str, Any]:
        assert self._config is not None
        data: dict[str, Any] = self._config.hook.pytest_report_to_serializable(
            config=self._config, report=report
        )
        return data

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.passed:
            return
        if report.failed:
            self._channel.send("collectreport", report=self._serialize(report))
            self._uncollected[report.nodeid] = f"collecting {report.nodeid} failed"
        else:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
            self._uncollected[report.nodeid] = f"{report.nodeid} skipped: {reason}"

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        for item in items:
            self._uncollected[item.nodeid] = f"{item.nodeid} deselected on the instance"

    def pytest_warning_recorded(
        self,
        warning_message: warnings.WarningMessage,
        when: str,
        nodeid: str,
        location: tuple[str, int, str] | None,
    ) -> None:
        category = warning_message.category
        self._channel.send(
            "warning",
            message=str(warning_message.message),
            category=category.__name__,
            category_module=category.__module__,
            filename=str(warning_message.filename),
            lineno=warning_message.lineno,
            nodeid=nodeid,
            when=when,
            location=location,
        )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._channel.queue("report", report=self._serialize(report))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        """Serve ``run`` frames until ``shutdown`` or EOF; pytest then ends the session."""
        items = {item.nodeid: item for item in session.items}
        self._channel.send("collected", count=len(items))
        self.collected = True
        while (frame := self._channel.recv()) is not None and frame["type"] != "shutdown":
            if frame["type"] != "run":
                raise ValueError(f"unexpected frame from the local side: {frame['type']!r}")
            if self._channel.shutdown_waiting():
                break
            nodeid: str = frame["nodeid"]
            item = items.get(nodeid)
            if item is None:
                self._channel.send("missing", nodeid=nodeid, reason=self._why_missing(nodeid))
                continue
            nextid: str | None = frame.get("nextid")
            nextitem = items.get(nextid) if nextid is not None else None
            self.fixtures.begin(frame)
            with _environment(frame.get("env") or {}), self._watchdog.guard(nodeid, frame):
                item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            self.fixtures.end()
            self._channel.send("done", nodeid=nodeid)
        return True

    def _why_missing(self, nodeid: str) -> str | None:
        owners = [
            owner
            for owner in self._uncollected
            if nodeid == owner or nodeid.startswith((owner + "::", owner + "/"))
        ]
        return self._uncollected[max(owners, key=len)] if owners else None

    def pytest_internalerror(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        self.crash(f"remote pytest internal error: {excinfo.exconly()}")

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        self.crash(f"remote pytest interrupted: {excinfo.exconly()}")


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """The allow-listed variables of one run frame, set for that test only."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve(channel: Channel) -> int:
    """Run one remote session over ``channel``; the process's exit status."""
    channel.send(
        "hello",
        python=platform.python_version(),
        pytest=pytest.__version__,
        protocol=PROTOCOL_VERSION,
        rootdir=os.getcwd(),
    )
    start = channel.recv()
    if start is None or start["type"] == "shutdown":
        return 0
    if start["type"] != "start":
        channel.send("crashed", message=f"expected a start frame, got {start['type']!r}")
        return 1
    os.environ.update(start.get("environ", {}))
    try:
        measurement = Measurement(start["coverage"]) if start.get("coverage") else None
    except Exception as exc:  # coverage missing, or too new for this Python
        channel.send("crashed", message=f"remote pytest could not start: {exc}")
        return 1
    plugin = WorkerPlugin(channel, start)
    # A private cache: an ini's --lf/--sw stay valid options yet see no remote history,
    # and nothing is written into the workspace.
    cache_dir = tempfile.mkdtemp(prefix="gpucloud-cache-")
    args = [*start["args"], *BLOCKED, "-o", f"cache_dir={cache_dir}"]
    try:
        code = pytest.main(args, plugins=[plugin, plugin.fixtures])
    except BaseException as exc:
        plugin.crash(f"remote pytest failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not plugin.collected:
        plugin.crash(f"remote pytest exited with status {int(code)} before collecting")
    if measurement is not None:
        channel.send("coverage", data=measurement.finish())
    return 1 if plugin.crashed else 0


def main() -> int:
    return serve(Channel.from_stdio())
