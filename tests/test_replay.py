"""Replaying remote reports into a local session gives what a local run gives.

The worker runs a copy of a pytester project in another folder (as on an instance); its
frames are replayed into a local session of the same project by a small conftest plugin,
and the result is compared with a plain local run: reports, junitxml, terminal output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

import pytest_gpucloud.remote
from pytest_gpucloud.remote.protocol import Message, decode, encode
from pytest_gpucloud.session.replay import _PathMap, remote_pytest_args

# This plugin stays out of the inner sessions (they replay by hand); hypothesis's plugin
# would re-import hypothesis in each of them (~1 s).
NO_PLUGIN = ("-p", "no:gpucloud", "-p", "no:hypothesispytest")

# Records every report and runtest warning; replays from PARITY_REPLAY instead of running.
CONFTEST = """
import json, os
import pytest

def record(entry):
    path = os.environ.get("PARITY_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\\n")

def pytest_runtest_logreport(report):
    data = json.loads(json.dumps(report._to_json()))
    for timing in ("duration", "start", "stop"):
        del data[timing]
    record({"report": data})

def pytest_warning_recorded(warning_message, when, nodeid, location):
    if when == "runtest":
        record({"warning": [str(warning_message.message), warning_message.category.__name__,
                            warning_message.filename, warning_message.lineno, nodeid]})

@pytest.fixture(scope="session")
def session_resource():
    print("session resource up")
    yield "gpu"

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("PARITY_REPLAY")
    if not path:
        return None
    from pytest_gpucloud.session.replay import replay_test
    with open(path) as f:
        data = json.load(f)
    replay_test(item, data["tests"][item.nodeid], remote_root=data["remote_root"],
                local_root=str(item.config.rootpath))
    return True
"""

TESTS = """
import logging, sys, unittest, warnings
import pytest

class GpuWarning(UserWarning):
    pass

@pytest.fixture
def broken_setup():
    raise RuntimeError("setup went wrong")

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown went wrong")

def test_pass(session_resource):
    print("to stdout")
    sys.stderr.write("to stderr\\n")
    logging.getLogger("demo").warning("a log line")

def test_fail():
    print("before the failure")
    assert {"a": 1, "b": [1, 2]} == {"a": 1, "b": [1, 3]}

def test_raises_chained():
    try:
        {}["key"]
    except KeyError as exc:
        raise ValueError("while looking up") from exc

def test_skip():
    pytest.skip("not today")

@pytest.mark.skip(reason="marked")
def test_skip_marked():
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert 0

@pytest.mark.xfail(reason="lucky")
def test_xpass():
    pass

@pytest.mark.xfail(reason="must fail", strict=True)
def test_xpass_strict():
    pass

def test_setup_error(broken_setup):
    pass

def test_teardown_error(broken_teardown):
    print("ran")

@pytest.mark.parametrize("value", ["a b", "\\u00e9t\\u00e9", "x/y", "[1]", "::"])
def test_ids(value):
    assert value != "x/y"

def test_warns(record_property):
    record_property("gpu", "A100")
    warnings.warn("careful", GpuWarning)

class TestGroup:
    def __repr__(self):  # the default one shows an address
        return "TestGroup()"

    def test_method(self):
        assert 1 + 1 == 3

class TestUnit(unittest.TestCase):
    def test_ok(self):
        self.assertEqual(1, 1)

    def test_fail(self):
        self.assertEqual([1, 2], [1, 3])

    @unittest.skip("unittest skip")
    def test_skip(self):
        pass
"""


@pytest.fixture(scope="session")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shipped")
    source = Path(pytest_gpucloud.remote.__file__).parent
    shutil.copytree(source, root / "gpucloud_remote", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run_worker(
    shipped: Path, workspace: Path, args: list[str], nodeids: list[str]
) -> list[Message]:
    """Run ``nodeids`` in order (each naming the next) in one worker; all its frames."""
    frames = [encode("start", args=args)]
    for i, nodeid in enumerate(nodeids):
        nextid = nodeids[i + 1] if i + 1 < len(nodeids) else None
        frames.append(encode("run", nodeid=nodeid, nextid=nextid))
    frames.append(encode("shutdown"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PARITY_"))}
    env.update(PYTHONPATH=str(shipped), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "gpucloud_remote"],
        cwd=workspace,
        env=env,
        input=b"".join(frames),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return [decode(line) for line in proc.stdout.splitlines()]


def by_test(frames: list[Message]) -> dict[str, list[Message]]:
    """Each test's report and warning frames, from a worker's frames."""
    tests: dict[str, list[Message]] = {}
    current: list[Message] = []
    running = False
    for frame in frames:
        running = running or frame["type"] == "collected"
        if running and frame["type"] in ("report", "warning"):
            current.append(frame)
        elif frame["type"] == "done":
            tests[frame["nodeid"]] = current
            current = []
    return tests


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def junit(path: Path) -> str:
    tree = ET.parse(path)
    for element in tree.iter():
        for timing in ("time", "timestamp", "hostname"):
            element.attrib.pop(timing, None)
    return ET.tostring(tree.getroot(), encoding="unicode")


def terminal(result: pytest.RunResult) -> list[str]:
    return [re.sub(r" in [\d.]+s", " in Xs", line) for line in result.outlines]


def test_replay_matches_a_local_run(
    pytester: pytest.Pytester,
    shipped: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytester.makeini("[pytest]\nxfail_strict = false\njunit_family = xunit1\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_parity=TESTS)
    # The instance's copy lives elsewhere, under another folder name.
    workspace = tmp_path_factory.mktemp("instance") / "ws"
    shutil.copytree(pytester.path, workspace)

    monkeypatch.setenv("PARITY_RECORD", str(pytester.path / "local.jsonl"))
    local = pytester.runpytest(*NO_PLUGIN, "-rA", "--junitxml=out.xml")
    local_xml = junit(pytester.path / "out.xml")
    expected = read_records(pytester.path / "local.jsonl")
    nodeids = list(dict.fromkeys(r["report"]["nodeid"] for r in expected if "report" in r))
    assert len(nodeids) == 20

    config = pytester.parseconfigure(*NO_PLUGIN)
    frames = run_worker(
        shipped, workspace, [*remote_pytest_args(config), "test_parity.py"], nodeids
    )
    hello = frames[0]
    assert hello["rootdir"] == os.path.realpath(workspace)
    (pytester.path / "replay.json").write_text(
        json.dumps({"remote_root": hello["rootdir"], "tests": by_test(frames)})
    )

    monkeypatch.setenv("PARITY_RECORD", str(pytester.path / "replayed.jsonl"))
    monkeypatch.setenv("PARITY_REPLAY", str(pytester.path / "replay.json"))
    replayed = pytester.runpytest(*NO_PLUGIN, "-rA", "--junitxml=out.xml")

    assert replayed.parseoutcomes() == local.parseoutcomes()
    assert replayed.ret == local.ret
    actual = read_records(pytester.path / "replayed.jsonl")
    for want, got in zip(expected, actual, strict=True):
        assert got == want
    assert str(workspace) not in (pytester.path / "replayed.jsonl").read_text()
    assert junit(pytester.path / "out.xml") == local_xml
    assert terminal(replayed) == terminal(local)


def test_remote_collection_errors_and_warnings(
    pytester: pytest.Pytester, shipped: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytester.makepyfile(
        test_here="def test_local():\n    pass\n", test_gpu="def test_gpu(): pass\n"
    )
    workspace = tmp_path_factory.mktemp("instance") / "ws"
    shutil.copytree(pytester.path, workspace)
    # What only the instance sees: a collection warning, a module that does not import.
    with (workspace / "test_here.py").open("a") as f:
        f.write("\nclass TestInit:\n    def __init__(self):\n        pass\n")
    (workspace / "test_gpu.py").write_text("import no_such_gpu_lib\n")
    frames = run_worker(shipped, workspace, ["--rootdir=.", "test_gpu.py", "test_here.py"], [])
    collection = [f for f in frames if f["type"] in ("collectreport", "warning")]
    assert [f["type"] for f in collection] == ["collectreport", "warning"]
    (pytester.path / "collection.json").write_text(
        json.dumps({"remote_root": frames[0]["rootdir"], "frames": collection})
    )
    pytester.makeconftest(
        """
        import json
        from pytest_gpucloud.session.replay import replay_collectreport, replay_warning

        def pytest_collection_finish(session):
            with open("collection.json") as f:
                data = json.load(f)
            roots = {"remote_root": data["remote_root"], "local_root": str(session.config.rootpath)}
            for frame in data["frames"]:
                if frame["type"] == "warning":
                    replay_warning(session.config, frame, **roots)
                else:
                    replay_collectreport(session, frame, **roots)
        """
    )
    result = pytester.runpytest(*NO_PLUGIN, "--junitxml=out.xml")
    # A collection error like any other: pytest stops before running tests.
    result.assert_outcomes(errors=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_gpu.py*",
            "E   ModuleNotFoundError: No module named 'no_such_gpu_lib'",
            f"  {pytester.path}/test_here.py:3: PytestCollectionWarning: cannot collect *",
            "*Interrupted: 1 error during collection*",
        ]
    )
    assert str(workspace) not in result.stdout.str()
    assert 'message="collection failure"' in (pytester.path / "out.xml").read_text()


def test_infra_errors_read_as_errors(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from pytest_gpucloud.session.replay import replay_infra_error, replay_test

        def setup_passed(item):
            report = pytest.TestReport(item.nodeid, item.location, {}, "passed", None, "setup")
            return {"type": "report", "report": item.config.hook.pytest_report_to_serializable(
                config=item.config, report=report)}

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_protocol(item):
            roots = {"remote_root": "/ws", "local_root": str(item.config.rootpath)}
            if item.name == "test_unprovisioned":
                replay_infra_error(item, "gpu-cloud: no A100 offer had capacity")
            elif item.name == "test_lost_in_call":
                replay_test(item, [setup_passed(item)], lost="instance i-7 stopped answering",
                            **roots)
            else:
                replay_test(item, [], lost="gpu-cloud: instance i-8 was deleted", **roots)
            return True
        """
    )
    pytester.makepyfile(
        """
        def test_unprovisioned(): pass
        def test_lost_in_call(): pass
        def test_lost_early(): pass
        """
    )
    result = pytester.runpytest(*NO_PLUGIN, "-rA", "--junitxml=out.xml")
    result.assert_outcomes(errors=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*= ERRORS =*",
            "*ERROR at setup of test_unprovisioned*",
            "gpu-cloud: no A100 offer had capacity",
            "*ERROR at setup of test_lost_early*",
            "gpu-cloud: instance i-8 was deleted",
            "*= FAILURES =*",
            "*_ test_lost_in_call _*",
            "gpu-cloud: instance i-7 stopped answering",
        ]
    )
    xml = (pytester.path / "out.xml").read_text()
    assert "failed on setup with &quot;gpu-cloud: no A100 offer had capacity&quot;" in xml
    assert "<skipped" not in xml


def test_remote_pytest_args(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_ADDOPTS")  # set by tests/conftest.py; every argument is listed here
    pytester.makeini(
        "[pytest]\naddopts = -p pytester\nasyncio_default_fixture_loop_scope = function\n"
    )
    config = pytester.parseconfigure(
        *NO_PLUGIN,
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "--import-mode=importlib",
        "-o",
        "xfail_strict=true",
        "-W",
        "error::DeprecationWarning",
        "--tb=short",
        "-l",
        "-vv",
    )
    assert remote_pytest_args(config) == [
        "--rootdir=.",
        "-c",
        "tox.ini",
        "-p",
        "pytester",
        "-p",
        "no:hypothesispytest",
        "-p",
        "no:xdist",
        "--import-mode=importlib",
        "--capture=fd",
        "--tb=short",
        "--showlocals",
        "-W",
        "error::DeprecationWarning",
        "-o",
        "verbosity_assertions=2",
        "-o",
        "xfail_strict=true",
    ]


def test_remote_pytest_args_without_ini_and_outside_rootdir(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfigure(*NO_PLUGIN)
    assert remote_pytest_args(config)[:3] == ["--rootdir=.", "-c", os.devnull]
    pytester.makeini("[pytest]\n")
    (pytester.path / "sub").mkdir()
    config = pytester.parseconfigure(*NO_PLUGIN, "--rootdir=sub", "-c", "tox.ini")
    with pytest.raises(
        pytest.UsageError, match=r"gpu-cloud: the ini file .* is outside the rootdir"
    ):
        remote_pytest_args(config)


def test_path_rewrite_keeps_to_whole_names() -> None:
    assert _PathMap("", "/home/me/proj").localize("/ws/a.py") == "/ws/a.py"
    paths = _PathMap("/ws/proj", "/home/me/proj")
    assert paths.localize(
        {"k": ["/ws/proj/a.py:3", "/ws/proj", "/ws/proj2/b.py", "/ws/proj.bak", 'at "/ws/proj":']}
    ) == {
        "k": [
            "/home/me/proj/a.py:3",
            "/home/me/proj",
            "/ws/proj2/b.py",
            "/ws/proj.bak",
            'at "/home/me/proj":',
        ]
    }
