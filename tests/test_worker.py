"""The remote worker as a real process, spoken to over its stdin/stdout.

The ``remote`` package is copied to a folder of its own as ``gpucloud_remote``, as it is
shipped, and started with ``python -m gpucloud_remote`` in a pytester project.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest

import pytest_gpucloud.remote
from pytest_gpucloud.remote.protocol import PROTOCOL_VERSION, Message, decode, encode

TIMEOUT = 30.0


@pytest.fixture(scope="session")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the remote package under its shipped name, for PYTHONPATH."""
    root = tmp_path_factory.mktemp("shipped")
    source = Path(pytest_gpucloud.remote.__file__).parent
    shutil.copytree(source, root / "gpucloud_remote", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def worker_env(shipped: Path, *, autoload: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(shipped)
    if not autoload:  # installed plugins (hypothesis: ~1 s) only where a test needs them
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


class Worker:
    """One ``python -m gpucloud_remote`` process; frames in, frames out."""

    def __init__(self, shipped: Path, cwd: Path, *, autoload: bool) -> None:
        self.stderr_path = cwd.parent / f"{cwd.name}-worker-stderr.txt"
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpucloud_remote"],
            cwd=cwd,
            env=worker_env(shipped, autoload=autoload),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._buffer = b""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, kind: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode(kind, **fields))
        self.proc.stdin.flush()

    def recv(self) -> Message | None:
        """The next frame; None at EOF."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], TIMEOUT)
            assert ready, f"no frame from the worker in {TIMEOUT}s; stderr:\n{self.stderr}"
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                assert not self._buffer, f"torn frame {self._buffer!r}"
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return decode(line)

    def expect(self, kind: str) -> Message:
        frame = self.recv()
        assert frame is not None, f"EOF waiting for {kind}; stderr:\n{self.stderr}"
        assert frame["type"] == kind, f"{frame}; stderr:\n{self.stderr}"
        return frame

    def start(self, *args: str, **fields: Any) -> list[Message]:
        """Send ``start``; the frames up to ``collected`` (included)."""
        self.send("start", args=["--rootdir=.", *args], **fields)
        frames = []
        while True:
            frame = self.recv()
            assert frame is not None, f"EOF before collected; stderr:\n{self.stderr}"
            frames.append(frame)
            if frame["type"] in ("collected", "crashed"):
                return frames

    def run(self, nodeid: str, nextid: str | None = None) -> list[Message]:
        """The frames of one ``run``, up to ``done`` or ``missing`` (included)."""
        self.send("run", nodeid=nodeid, nextid=nextid)
        frames = []
        while True:
            frame = self.recv()
            assert frame is not None, f"EOF during {nodeid}; stderr:\n{self.stderr}"
            frames.append(frame)
            if frame["type"] in ("done", "missing"):
                assert frame["nodeid"] == nodeid
                return frames

    def finish(self, *, shutdown: bool = True) -> tuple[int, list[Message]]:
        """Send ``shutdown`` (or just close stdin); exit status and the frames after."""
        assert self.proc.stdin is not None
        if shutdown:
            self.send("shutdown")
        self.proc.stdin.close()
        frames = []
        while (frame := self.recv()) is not None:
            frames.append(frame)
        status = self.proc.wait(TIMEOUT)
        self._stderr.close()
        return status, frames

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


@pytest.fixture
def worker(shipped: Path, pytester: pytest.Pytester) -> Any:
    """A factory of workers in the pytester project; all are killed at the end.

    Installed plugins are loaded only with ``autoload=True``."""
    started: list[Worker] = []

    def make(*, autoload: bool = False) -> Worker:
        started.append(Worker(shipped, pytester.path, autoload=autoload))
        return started[-1]

    yield make
    for one in started:
        one.kill()


def outcomes(frames: list[Message]) -> list[tuple[str, str]]:
    return [(f["report"]["when"], f["report"]["outcome"]) for f in frames if f["type"] == "report"]


def test_hello_collection_and_outcomes(worker: Any, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_outcomes="""
        import os, sys
        import pytest

        def test_pass():
            print("printed by the test")
            os.write(1, b"written to fd 1\\n")

        def test_fail():
            assert 1 == 2

        def test_skip():
            pytest.skip("not today")

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert 0

        def test_stdin():
            sys.stdin.read()

        def test_fd0_is_devnull():
            assert os.read(0, 100) == b""
        """
    )
    w = worker()
    hello = w.expect("hello")
    assert hello["protocol"] == PROTOCOL_VERSION
    assert hello["pytest"] == pytest.__version__
    assert hello["python"] == ".".join(map(str, sys.version_info[:3]))
    assert hello["rootdir"] == os.path.realpath(pytester.path)
    assert w.start("test_outcomes.py")[-1] == {"type": "collected", "count": 6}

    frames = w.run("test_outcomes.py::test_pass", "test_outcomes.py::test_fail")
    assert outcomes(frames) == [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
    call = frames[1]["report"]
    assert call["nodeid"] == "test_outcomes.py::test_pass"
    assert ["Captured stdout call", "printed by the test\nwritten to fd 1\n"] in call["sections"]

    assert outcomes(w.run("test_outcomes.py::test_fail"))[1] == ("call", "failed")
    skip = w.run("test_outcomes.py::test_skip")[1]["report"]
    assert skip["outcome"] == "skipped"
    assert skip["longrepr"][2] == "Skipped: not today"
    xfail = w.run("test_outcomes.py::test_xfail")[1]["report"]
    assert (xfail["outcome"], xfail["wasxfail"]) == ("skipped", "known")
    stdin = w.run("test_outcomes.py::test_stdin")[1]["report"]
    assert stdin["outcome"] == "failed"
    assert (
        "reading from stdin while output is captured" in stdin["longrepr"]["reprcrash"]["message"]
    )
    assert outcomes(w.run("test_outcomes.py::test_fd0_is_devnull"))[1] == ("call", "passed")
    assert w.finish() == (0, [])


def test_uncaptured_output_and_input_leave_the_channel_alone(
    worker: Any, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        test_noisy="""
        import os, subprocess, sys
        import pytest

        def test_noise():
            print("print to stdout")
            os.write(1, b"os.write to fd 1\\n")
            subprocess.run([sys.executable, "-c", "print('child stdout')"], check=True)
            with pytest.raises(EOFError):
                input()
        """
    )
    w = worker()
    w.expect("hello")
    w.start("-s", "test_noisy.py")
    assert outcomes(w.run("test_noisy.py::test_noise"))[1] == ("call", "passed")
    assert w.finish() == (0, [])
    for text in ("print to stdout", "os.write to fd 1", "child stdout"):
        assert text in w.stderr


def test_fixtures_live_across_runs_until_nextitem_leaves(
    worker: Any, pytester: pytest.Pytester
) -> None:
    log = pytester.path / "fixtures.log"
    pytester.makeconftest(
        f"""
        import pytest

        def note(text):
            with open({str(log)!r}, "a") as f:
                f.write(text + "\\n")

        @pytest.fixture(scope="session")
        def sess():
            note("session up")
            yield
            note("session down")

        @pytest.fixture(scope="module")
        def mod(sess):
            note("module up")
            yield
            note("module down")
        """
    )
    pytester.makepyfile(
        test_a="def test_1(mod): pass\ndef test_2(mod): pass\ndef test_3(mod): pass\n",
        test_b="def test_1(mod): pass\ndef test_2(mod): pass\n",
    )
    w = worker()
    w.expect("hello")
    w.start("test_a.py", "test_b.py")
    w.run("test_a.py::test_1", "test_a.py::test_2")
    w.run("test_a.py::test_2", "test_a.py::test_3")
    assert log.read_text().splitlines() == ["session up", "module up"]
    w.run("test_a.py::test_3", "test_b.py::test_1")
    assert log.read_text().splitlines() == ["session up", "module up", "module down"]
    # nextid names a test that never comes: session and module stay up until shutdown.
    w.run("test_b.py::test_1", "test_b.py::test_2")
    assert log.read_text().splitlines()[-1] == "module up"
    assert w.finish() == (0, [])
    assert log.read_text().splitlines()[-2:] == ["module down", "session down"]


def test_nextid_none_tears_everything_down(worker: Any, pytester: pytest.Pytester) -> None:
    # The worker's private cache dir must not upset a session without a cache.
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider --strict-config\n")
    pytester.makepyfile(
        test_scoped="""
        import pytest

        SETUPS = []

        @pytest.fixture(scope="session")
        def sess():
            SETUPS.append(1)
            yield len(SETUPS)

        def test_1(sess):
            assert sess == 1

        def test_2(sess):
            assert sess == 2
        """
    )
    w = worker()
    w.expect("hello")
    w.start("-c", "tox.ini", "test_scoped.py")
    assert outcomes(w.run("test_scoped.py::test_1", None))[1] == ("call", "passed")
    assert outcomes(w.run("test_scoped.py::test_2", None))[1] == ("call", "passed")
    assert w.finish(shutdown=False) == (0, [])  # EOF ends the session like shutdown


def test_teardown_error_at_session_end_follows_shutdown(
    worker: Any, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        test_end="""
        import pytest

        @pytest.fixture(scope="session")
        def sess():
            yield
            raise RuntimeError("could not free the GPU")

        def test_1(sess):
            pass

        def test_2(sess):
            pass
        """
    )
    w = worker()
    w.expect("hello")
    w.start("test_end.py")
    assert outcomes(w.run("test_end.py::test_1", "test_end.py::test_2"))[2] == (
        "teardown",
        "passed",
    )
    status, after = w.finish()
    assert status != 0
    assert after == [{"type": "crashed", "message": "remote pytest failed: could not free the GPU"}]


def test_collection_problems_warnings_and_missing(worker: Any, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_broken="import no_such_module_for_gpucloud\n",
        test_skipped="import pytest\npytest.importorskip('no_such_module_for_gpucloud')\n",
        test_ok="""
        import warnings

        class TestHasInit:
            def __init__(self):
                pass

        def test_warns():
            warnings.warn("careful with that axe", RuntimeWarning)
        """,
    )
    w = worker()
    w.expect("hello")
    before = w.start("test_broken.py", "test_skipped.py", "test_ok.py")
    kinds = [f["type"] for f in before]
    assert kinds.count("collectreport") == 1
    broken = next(f for f in before if f["type"] == "collectreport")["report"]
    assert (broken["nodeid"], broken["outcome"]) == ("test_broken.py", "failed")
    assert "no_such_module_for_gpucloud" in broken["longrepr"]
    collect_warning = next(f for f in before if f["type"] == "warning")
    assert collect_warning["category"] == "PytestCollectionWarning"
    assert collect_warning["category_module"] == "pytest"
    assert collect_warning["when"] == "collect"
    assert before[-1] == {"type": "collected", "count": 1}

    missing = w.run("test_broken.py::test_x")[-1]
    assert missing["reason"] == "collecting test_broken.py failed"
    missing = w.run("test_skipped.py::test_y")[-1]
    assert missing["reason"].startswith("test_skipped.py skipped: ")
    assert "no_such_module_for_gpucloud" in missing["reason"]
    assert w.run("test_ok.py::test_nope")[-1] == {
        "type": "missing",
        "nodeid": "test_ok.py::test_nope",
        "reason": None,
    }

    frames = w.run("test_ok.py::test_warns")
    assert [f["type"] for f in frames] == ["report", "report", "report", "warning", "done"]
    warning = frames[3]
    assert warning["message"] == "careful with that axe"
    assert (warning["category"], warning["category_module"]) == ("RuntimeWarning", "builtins")
    assert (warning["nodeid"], warning["when"]) == ("test_ok.py::test_warns", "runtest")
    assert warning["filename"] == os.path.realpath(pytester.path / "test_ok.py")
    assert warning["lineno"] == 8
    assert w.finish() == (0, [])


def test_local_plugin_options_are_inert(worker: Any, pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        addopts = --gpu-cloud --gpu-cloud-budget 3 --strict-markers --strict-config
                  --junitxml=remote.xml --lf --sw -n 2
        gpu_cloud_provider = sim
        """
    )
    pytester.makepyfile(
        test_gpu="""
        import os
        import pytest

        @pytest.mark.gpu("A100")
        def test_gpu():
            assert "PYTEST_XDIST_WORKER" not in os.environ

        def test_other():
            pass
        """
    )
    # A workspace that persists between sessions keeps its own history; --lf must not
    # deselect by it.
    lastfailed = pytester.path / ".pytest_cache" / "v" / "cache" / "lastfailed"
    lastfailed.parent.mkdir(parents=True)
    lastfailed.write_text('{"test_gpu.py::test_other": true}')
    w = worker(autoload=True)  # the installed gpucloud entry point is blocked, xdist inert
    w.expect("hello")
    collected = w.start(
        "-c",
        "tox.ini",
        "test_gpu.py",
        options=[
            {"name": "--gpu-cloud", "takes_value": False},
            {"name": "--gpu-cloud-budget", "takes_value": True},
        ],
        ini=["gpu_cloud_provider"],
    )
    assert collected[-1] == {"type": "collected", "count": 2}, w.stderr
    assert outcomes(w.run("test_gpu.py::test_gpu"))[1] == ("call", "passed")
    assert w.finish() == (0, [])
    left = {p.name for p in pytester.path.iterdir()} - {"__pycache__"}
    assert left == {".pytest_cache", "test_gpu.py", "tox.ini"}  # no junitxml
    assert [p.name for p in (pytester.path / ".pytest_cache").rglob("*")] == [
        "v",
        "cache",
        "lastfailed",
    ]


def test_usage_error_is_reported_as_crashed(worker: Any, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = --gpu-cloud\n")
    w = worker()
    w.expect("hello")
    crashed = w.start("-c", "tox.ini")[-1]
    assert crashed["type"] == "crashed"
    assert "unrecognized arguments: --gpu-cloud" in crashed["message"]
    status, after = w.finish(shutdown=False)
    assert status != 0
    assert after == []


def test_missing_file_is_reported_as_crashed(worker: Any, pytester: pytest.Pytester) -> None:
    w = worker()
    w.expect("hello")
    crashed = w.start("test_not_there.py")[-1]
    assert crashed == {
        "type": "crashed",
        "message": "remote pytest could not start: file or directory not found: test_not_there.py",
    }
    assert w.finish(shutdown=False)[0] != 0


def test_unexpected_frame_is_an_internal_error(worker: Any, pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_1(): pass\n")
    w = worker()
    w.expect("hello")
    w.start()
    w.send("bogus")
    crashed = w.expect("crashed")
    assert "unexpected frame from the local side: 'bogus'" in crashed["message"]
    status, _ = w.finish(shutdown=False)
    assert status != 0


def test_shutdown_skip_waiting_skips_the_runs_sent_ahead(
    worker: Any, pytester: pytest.Pytester
) -> None:
    log = pytester.path / "ran.txt"
    pytester.makepyfile(
        test_skip_waiting=f"""
        def test_a():
            open({str(log)!r}, "a").write("a")

        def test_b():
            open({str(log)!r}, "a").write("b")
        """
    )
    w = worker()
    w.expect("hello")
    assert w.start()[-1]["type"] == "collected"
    assert w.proc.stdin is not None
    # In one write, as a local side that read ahead and then ends its session would.
    w.proc.stdin.write(
        encode("run", nodeid="test_skip_waiting.py::test_a", nextid="test_skip_waiting.py::test_b")
        + encode("run", nodeid="test_skip_waiting.py::test_b", nextid=None)
        + encode("shutdown", skip_waiting=True)
    )
    w.proc.stdin.flush()
    status, frames = w.finish(shutdown=False)
    assert status == 0, w.stderr
    assert [f for f in frames if f["type"] in ("report", "done")] == []
    assert not log.exists(), "no run sent ahead of the shutdown started"


def test_bootstrap_imports_pytest_then_waits_for_go(shipped: Path, tmp_path: Path) -> None:
    """remote/boot.py: pytest is imported before the workspace is complete, never from it;
    the worker proper starts on the go byte, and EOF instead ends it quietly."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # A half-synced workspace must not be imported from before the go.
    (workspace / "pytest.py").write_text("raise SystemExit('imported from the workspace')\n")
    boot = [sys.executable, "-c", pytest_gpucloud.remote.source("boot")]
    env = worker_env(shipped, autoload=False)
    given_up = subprocess.run(
        boot, cwd=workspace, env=env, input=b"", capture_output=True, timeout=TIMEOUT
    )
    assert (given_up.returncode, given_up.stdout) == (0, b'{"type":"loaded"}\n'), given_up.stderr
    proc = subprocess.Popen(
        boot, cwd=workspace, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert decode(proc.stdout.readline()) == {"type": "loaded"}
    proc.stdin.write(b"g")
    proc.stdin.flush()
    hello = decode(proc.stdout.readline())
    assert (hello["type"], hello["rootdir"]) == ("hello", str(workspace))
    assert hello["pytest"] == pytest.__version__
    proc.stdin.close()  # EOF before start: the worker ends without a session
    assert proc.wait(TIMEOUT) == 0
