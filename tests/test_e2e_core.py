"""End-to-end: real pytest sessions run gpu tests on the simulated cloud over HTTP and SSH."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.cloud import GpuRun, Sim

OUTCOMES = """
import logging
import unittest

import pytest

pytestmark = pytest.mark.gpu("T4")


def test_pass():
    print("hello from the test")
    logging.getLogger("example").warning("a log line")


def test_fail():
    assert [1, 2, 3] == [1, 2, 4]


def test_skip():
    pytest.skip("not today")


@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert 0


@pytest.mark.xfail(reason="maybe fixed")
def test_xpass():
    pass


@pytest.mark.xfail(strict=True, reason="strict")
def test_strict_xpass():
    pass


@pytest.fixture
def broken_setup():
    raise RuntimeError("setup broke")


def test_setup_error(broken_setup):
    pass


@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown broke")


def test_teardown_error(broken_teardown):
    pass


@pytest.mark.parametrize("value", ["a b", "\u00fcn\u00ef", "x/y", "1.5"])
def test_params(value):
    assert value != "x/y"


class TestGroup:
    def test_method(self):
        assert True

    def test_method_fails(self):
        assert 2 + 2 == 5


class MyCase(unittest.TestCase):
    def test_ok(self):
        self.assertEqual(1, 1)

    def test_bad(self):
        self.assertEqual(1, 2)
"""

INI = "[pytest]\nmarkers =\n    gpu: runs on a GPU\n"


def _junit(path: Path) -> set[tuple[str, str, str, str]]:
    cases = set()
    for case in ET.parse(path).getroot().iter("testcase"):
        children = [c for c in case if c.tag in ("failure", "error", "skipped")]
        kinds = ",".join(sorted(f"{c.tag}:{c.get('message', '')}" for c in children))
        cases.add((case.get("classname", ""), case.get("name", ""), kinds, ""))
    return cases


def _summary(lines: list[str]) -> list[str]:
    start = lines.index(next(line for line in lines if "short test summary info" in line))
    return sorted(line for line in lines[start + 1 :] if not line.startswith("="))


@pytest.mark.parametrize("on_ci", [False, True], ids=["laptop", "ci"])
def test_remote_outcomes_match_a_local_run(
    gpu_run: GpuRun, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, on_ci: bool
) -> None:
    # pytest shows full assertion diffs on CI: the remote session must do as the local one
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
    if on_ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    pytester.makeini(INI)
    pytester.makepyfile(test_outcomes=OUTCOMES)
    remote = gpu_run("-rA", "--junitxml=remote.xml")
    local = pytester.runpytest_inprocess("-p", "no:gpucloud", "-rA", "--junitxml=local.xml")
    assert remote.parseoutcomes() == local.parseoutcomes()
    assert local.parseoutcomes()["failed"] == 5
    assert _junit(pytester.path / "remote.xml") == _junit(pytester.path / "local.xml")
    assert _summary(remote.outlines) == _summary(local.outlines)
    for text in (
        "hello from the test",
        "a log line",
        "assert [1, 2, 3] == [1, 2, 4]",
        "RuntimeError: teardown broke",
        "Captured stdout call",
        "Captured log call",
    ):
        assert text in remote.stdout.str()
    # an editor click opens the local file: paths in reports are this machine's
    remote.stdout.fnmatch_lines(["test_outcomes.py:*: AssertionError"])
    assert "gpucloud/" not in remote.stdout.str().replace("gpu-cloud", "")


def test_lf_reruns_only_remote_failures(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_good():
            pass

        @pytest.mark.gpu("T4")
        def test_bad():
            assert False
        """
    )
    gpu_run().assert_outcomes(passed=1, failed=1)
    again = gpu_run("--lf", "-v")
    assert again.parseoutcomes()["failed"] == 1
    assert "passed" not in again.parseoutcomes()
    again.stdout.fnmatch_lines(
        ["*run-last-failure: rerun previous 1 failure*", "*test_bad FAILED*"]
    )


def test_x_stops_after_first_remote_failure(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.gpu("T4")

        def test_one():
            assert False

        def test_two():
            pass
        """
    )
    result = gpu_run("-x")
    result.assert_outcomes(failed=1)
    assert "stopping after 1 failures" in result.stdout.str()


def test_collect_only_creates_no_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    before = len(sim.instances())
    result = gpu_run("--collect-only")
    assert result.ret == 0
    assert len(sim.instances()) == before


def test_module_fixture_is_set_up_once_across_remote_tests(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.gpu("T4")
        SETUPS = []

        @pytest.fixture(scope="module")
        def expensive():
            SETUPS.append(1)
            return len(SETUPS)

        def test_a(expensive):
            assert SETUPS == [1]

        def test_b(expensive):
            assert SETUPS == [1]

        def test_c(expensive):
            assert SETUPS == [1]
        """
    )
    before = len(sim.instances())
    gpu_run().assert_outcomes(passed=3)
    assert len(sim.instances()) == before + 1, "one instance for three tests of one type"


def test_unmarked_tests_run_locally_beside_remote_ones(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.gpu("T4")
        def test_remote():
            assert os.environ.get("GPUCLOUD_SIM_INSTANCE")

        def test_local():
            assert not os.environ.get("GPUCLOUD_SIM_INSTANCE")
        """
    )
    gpu_run().assert_outcomes(passed=2)


def test_summary_lists_every_instance_with_its_cost(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_t4():
            pass

        @pytest.mark.gpu("A100-80GB")
        def test_a100():
            pass
        """
    )
    result = gpu_run()
    result.assert_outcomes(passed=2)
    ids = [i["id"] for i in sim.instances()[-2:]]
    text = result.stdout.str()
    assert "gpu-cloud" in text
    for instance_id in ids:
        assert instance_id in text
    result.stdout.fnmatch_lines(["*T4*test*s  $*", "*A100-80GB*s  $*", "total: 2 instance(s)*"])


def test_interrupted_session_deletes_its_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_remote():
            pass

        def test_local_interrupt():
            raise KeyboardInterrupt
        """
    )
    result = gpu_run.subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*1 passed*"])
    assert sim.instances()[-1]["status"] == "terminated"


def test_failing_session_deletes_its_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    assert 0\n")
    result = gpu_run()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert sim.instances()[-1]["status"] == "terminated"


def test_a_different_host_key_is_refused(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    sim.fault(kind="wrong_host_key")
    result = gpu_run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*gpu-cloud: instance i-* presented an SSH host key that differs*"]
    )
    assert "Traceback" not in result.stdout.str()


def test_standalone_sim_and_embedded_sim_agree(
    gpu_run: GpuRun, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_outcomes=OUTCOMES)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pytest_gpucloud.sim", "--port", str(port), "--boot-delay", "0.05"],
        stdout=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "GPUCLOUD_API_KEY"},
    )
    try:
        _wait_port(port)
        assert server.stdout is not None
        server.stdout.readline()
        key = server.stdout.readline().decode().rsplit(" ", 1)[1].strip()
        monkeypatch.setenv("GPUCLOUD_API_KEY", key)  # the key it made and printed
        standalone = pytester.runpytest_inprocess(
            "--gpu-cloud", "--gpu-provider", "rest", "--gpu-api-url", f"http://127.0.0.1:{port}"
        )
    finally:
        server.terminate()
        assert server.wait(10) == 0
    monkeypatch.delenv("GPUCLOUD_API_KEY")
    embedded = pytester.runpytest_inprocess(
        "--gpu-cloud", "--gpu-provider", "sim", "--gpu-sim-boot-delay", "0.05"
    )
    assert standalone.parseoutcomes() == embedded.parseoutcomes()
    assert embedded.parseoutcomes()["passed"] == 7
    embedded.stdout.fnmatch_lines(
        ["gpu-cloud: provider sim (the simulated GPU cloud*CPU*not pulled)"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the standalone sim did not listen on {port}")


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["alone", "xdist"])
def test_an_infrastructure_error_gives_its_reason_in_the_short_summary(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester, workers: tuple[str, ...]
) -> None:
    """pytest 8 prints a reason there only from a report's crash line (``nox -s lowest``
    runs this file); through xdist the report crosses a process boundary first."""
    pytester.makepyfile(test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    sim.fault(kind="boot_never")
    result = gpu_run("-rE", "--gpu-boot-timeout", "1", *workers)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["ERROR test_x.py::test_a - gpu-cloud: *"])
