"""The long-lived remote pytest session.

Started on the instance as ``python3 -m gpucloud_remote`` (cwd: the synced workspace). It
speaks the frames of :mod:`.protocol` over its original stdin/stdout, collects once, then
runs the tests the local side asks for, one ``run`` frame at a time, keeping module and
session fixtures alive between consecutive tests exactly as the local ``nextitem`` would.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, BinaryIO

import pytest

from .protocol import PROTOCOL_VERSION, Message, decode, encode

if TYPE_CHECKING:
    import warnings
    from collections.abc import Generator, Iterator

GPU_MARKER = "gpu(spec=None, *, count=1, vram=None, image=None, timeout=None, env=(), data=None): "
GPU_MARKER += "run this test on a cloud GPU instance (pytest-gpucloud)"

# The local plugin must not load again on the instance, whatever name it was loaded by.
BLOCKED = ["-p", "no:gpucloud", "-p", "no:pytest_gpucloud.plugin"]


class Channel:
    """The frame channel: private copies of the process's original stdin and stdout."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    def from_stdio(cls) -> Channel:
        """Take fds 0 and 1 for the channel; leave /dev/null on 0 and stderr on 1.

        pytest's capture, a test's ``print`` or a child process can then neither read
        frames meant for the worker nor write into the channel.
        """
        reader = os.fdopen(os.dup(0), "rb")
        writer = os.fdopen(os.dup(1), "wb")
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        return cls(reader, writer)

    def send(self, kind: str, **fields: Any) -> None:
        self._writer.write(encode(kind, **fields))
        self._writer.flush()

    def recv(self) -> Message | None:
        """The next frame, or None at EOF."""
        line = self._reader.readline()
        return decode(line) if line else None


class WorkerPlugin:
    """Registered into the remote session: serves ``run`` frames from pytest_runtestloop."""

    def __init__(self, channel: Channel, start: Message) -> None:
        self._channel = channel
        self._options: list[dict[str, Any]] = start.get("options", [])
        self._ini: list[str] = start.get("ini", [])
        self._config: pytest.Config | None = None
        # nodeid of a collector or deselected item -> why its tests are not here
        self._uncollected: dict[str, str] = {}
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
            self.crash(f"remote pytest {'failed' if self.collected else 'could not start'}: {exc}")
            raise

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
        self._channel.send("report", report=self._serialize(report))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        """Serve ``run`` frames until ``shutdown`` or EOF; pytest then ends the session."""
        items = {item.nodeid: item for item in session.items}
        self._channel.send("collected", count=len(items))
        self.collected = True
        while (frame := self._channel.recv()) is not None and frame["type"] != "shutdown":
            if frame["type"] != "run":
                raise ValueError(f"unexpected frame from the local side: {frame['type']!r}")
            nodeid: str = frame["nodeid"]
            item = items.get(nodeid)
            if item is None:
                self._channel.send("missing", nodeid=nodeid, reason=self._why_missing(nodeid))
                continue
            nextid: str | None = frame.get("nextid")
            nextitem = items.get(nextid) if nextid is not None else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
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
    plugin = WorkerPlugin(channel, start)
    # A private cache: an ini's --lf/--sw stay valid options yet see no remote history,
    # and nothing is written into the workspace.
    cache_dir = tempfile.mkdtemp(prefix="gpucloud-cache-")
    args = [*start["args"], *BLOCKED, "-o", f"cache_dir={cache_dir}"]
    try:
        code = pytest.main(args, plugins=[plugin])
    except BaseException as exc:
        plugin.crash(f"remote pytest failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not plugin.collected:
        plugin.crash(f"remote pytest exited with status {int(code)} before collecting")
    return 1 if plugin.crashed else 0


def main() -> int:
    return serve(Channel.from_stdio())
