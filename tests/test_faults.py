"""Faults a session must survive, each injected through the simulated cloud.

Every test runs real pytest sessions against the sim; the ``sim`` fixture fails a test that
leaves an instance alive. An infrastructure failure is a setup ERROR whose message starts
with ``gpu-cloud:`` and names the instance and the cause; the tests that did not meet the
fault still run.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pytest_gpucloud.core.labels import project_label
from tests.cloud import GpuRun, Sim

ONE_TEST = "import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n"

# A test that marks its moment in the instance's home (the sim's on_file faults watch
# for it), then hangs: whatever happens next is the fault's doing.
FOUR_TESTS = """
import pathlib
import time

import pytest

pytestmark = pytest.mark.gpu("T4")


def test_1():
    pass


def test_2():
    (pathlib.Path.home() / "{trigger}").touch()
    time.sleep(60)


def test_3():
    pass


def test_4():
    pass
"""


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole error lines in the short test summary."""
    monkeypatch.setenv("COLUMNS", "400")


def outcomes(result: pytest.RunResult) -> dict[str, int]:
    return {k: v for k, v in result.parseoutcomes().items() if k not in ("warnings", "warning")}


def new_instances(sim: Sim, before: set[str]) -> list[dict[str, Any]]:
    return [i for i in sim.instances() if i["id"] not in before]


def ids(sim: Sim) -> set[str]:
    return {i["id"] for i in sim.instances()}


def error_line(result: pytest.RunResult, test: str) -> str:
    """The short summary line of ``test``'s ERROR (run with ``-rE``)."""
    return next(line for line in result.outlines if line.startswith(f"ERROR {test}"))


def wait_until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting: {what}")


# The API


def test_rate_limited_create_waits_for_retry_after(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=ONE_TEST)
    sim.fault(
        kind="http_error", op="create", status=429, code="rate_limited", retry_after=1, times=2
    )
    start = len(sim.requests())
    gpu_run().assert_outcomes(passed=1)
    creates = [r for r in sim.requests()[start:] if r["method"] == "POST"]
    assert [r["status"] for r in creates] == [429, 429, 201]
    arrived = [_seconds(r["time"]) for r in creates]
    assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(arrived))


def test_create_failing_after_it_made_the_instance_gives_one_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=ONE_TEST)
    sim.fault(kind="http_error_after", op="create", status=500, times=1)
    before, start = ids(sim), len(sim.requests())
    gpu_run().assert_outcomes(passed=1)
    assert len(new_instances(sim, before)) == 1, "the retried create made a second instance"
    creates = [r["status"] for r in sim.requests()[start:] if r["method"] == "POST"]
    assert creates == [500, 201]


def test_out_of_capacity_everywhere_errors_each_test_with_the_reason(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        test_x="import pytest\n\npytestmark = pytest.mark.gpu('T4')\n\n"
        "def test_a():\n    pass\n\ndef test_b():\n    pass\n\ndef test_c():\n    pass\n",
        test_here="def test_here():\n    pass\n",
    )
    sim.fault(kind="http_error", op="create", status=503, code="out_of_capacity", times=None)
    before = ids(sim)
    result = gpu_run("-rE")
    assert outcomes(result) == {"errors": 3, "passed": 1}
    for test in ("test_a", "test_b", "test_c"):
        line = error_line(result, f"test_x.py::{test}")
        assert line.startswith(f"ERROR test_x.py::{test} - gpu-cloud: ")
        assert "out of capacity" in line
        assert "T4 in us-east-1" in line
    result.stdout.fnmatch_lines(["gpu-cloud: 3 infrastructure error(s)*not test failures*"])
    assert new_instances(sim, before) == []


# Boot and SSH


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("boot_never", "did not boot within 1 s (still provisioning)"),
        ("ssh_refuse", "connection refused"),
    ],
)
def test_instance_that_never_answers_is_deleted_and_its_tests_error(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester, fault: str, cause: str
) -> None:
    pytester.makepyfile(test_x=ONE_TEST)
    sim.fault(kind=fault)
    before = ids(sim)
    result = gpu_run("-rE", "--gpu-boot-timeout", "1")
    assert outcomes(result) == {"errors": 1}
    [instance] = new_instances(sim, before)
    line = error_line(result, "test_x.py::test_a")
    assert line.startswith("ERROR test_x.py::test_a - gpu-cloud: ")
    assert instance["id"] in line
    assert cause in line
    assert instance["termination_reason"] == "deleted"


def test_dropped_ssh_errors_that_test_and_the_rest_run_on_a_fresh_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=FOUR_TESTS.format(trigger="drop-now"))
    sim.fault(kind="drop_ssh", on_file="drop-now")
    before = ids(sim)
    result = gpu_run("-rE")
    assert outcomes(result) == {"passed": 3, "errors": 1}
    first, second = new_instances(sim, before)
    line = error_line(result, "test_x.py::test_2")
    assert f"gpu-cloud: the remote worker on instance {first['id']} stopped while running" in line
    assert "SSH connection lost" in line
    assert second["termination_reason"] == first["termination_reason"] == "deleted"


def test_lost_instances_are_replaced_at_most_gpu_retries_times(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=FOUR_TESTS.format(trigger="drop-now"))
    sim.fault(kind="drop_ssh", on_file="drop-now")
    before = ids(sim)
    result = gpu_run("-rE", "--gpu-retries", "0")
    assert outcomes(result) == {"passed": 1, "errors": 3}
    assert len(new_instances(sim, before)) == 1
    for test in ("test_3", "test_4"):
        assert "--gpu-retries allows 0 fresh one(s)" in error_line(result, f"test_x.py::{test}")


def test_preempted_instance_errors_its_test_and_the_rest_run_on_a_fresh_one(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=FOUR_TESTS.format(trigger="lose-me"))
    sim.fault(kind="preempt", on_file="lose-me")
    before = ids(sim)
    result = gpu_run("-rE")
    assert outcomes(result) == {"passed": 3, "errors": 1}
    first, second = new_instances(sim, before)
    assert first["termination_reason"] == "preempted"
    assert second["termination_reason"] == "deleted"
    assert f"instance {first['id']} stopped while running test_x.py::test_2" in error_line(
        result, "test_x.py::test_2"
    )


# The remote worker


def test_killed_worker_is_reported_on_its_test_and_restarted_on_the_same_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        test_x="""
        import os
        import signal

        import pytest

        pytestmark = pytest.mark.gpu("T4")

        def test_1():
            pass

        def test_2():
            os.kill(os.getpid(), signal.SIGKILL)

        def test_3():
            pass
        """
    )
    before = ids(sim)
    result = gpu_run("-rE")
    assert outcomes(result) == {"passed": 2, "errors": 1}
    [instance] = new_instances(sim, before)
    line = error_line(result, "test_x.py::test_2")
    assert f"instance {instance['id']} stopped while running test_x.py::test_2" in line
    assert "killed by SIGKILL" in line
    workers = [c["exit_status"] for c in instance["commands"] if "gpucloud_remote" in c["command"]]
    assert len(workers) == 2, "the worker was not restarted on its instance"
    assert workers[0] == -signal.SIGKILL


@pytest.mark.parametrize("limit", ["marker", "option"])
def test_test_over_its_time_limit_is_stopped_remotely_and_the_worker_restarted(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester, limit: str
) -> None:
    marker = "timeout=1" if limit == "marker" else "timeout=None"
    pytester.makepyfile(
        test_x=f"""
        import time

        import pytest

        def test_1():
            pass

        @pytest.mark.gpu("T4", {marker})
        def test_slow():
            time.sleep(60)

        @pytest.mark.gpu("T4")
        def test_3():
            pass

        test_1 = pytest.mark.gpu("T4")(test_1)
        """
    )
    before = ids(sim)
    result = gpu_run("-rEf", *(["--gpu-timeout", "1"] if limit == "option" else []))
    # A failure of the phase it was in (its call), as a local time limit would report it.
    assert outcomes(result) == {"passed": 2, "failed": 1}
    [instance] = new_instances(sim, before)
    line = next(line for line in result.outlines if line.startswith("FAILED test_x.py::test_slow"))
    assert f"exceeded its time limit of 1 s on instance {instance['id']}" in line
    assert "ERROR at setup of test_slow" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*time.sleep(60)*"])  # where it hung
    workers = [c["exit_status"] for c in instance["commands"] if "gpucloud_remote" in c["command"]]
    assert len(workers) == 2, "the worker was not restarted on its instance"
    assert workers[0] == 124, "not stopped by its own watchdog"


# Deletes


def test_delete_answering_503_three_times_then_404_counts_as_deleted(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=ONE_TEST)
    # The first delete is carried out, then answered 503; so are two more; the next is a 404.
    sim.fault(kind="http_error_after", op="delete", status=503, code="internal")
    sim.fault(kind="http_error", op="delete", status=503, code="internal", times=2)
    start = len(sim.requests())
    result = gpu_run()
    assert result.ret == 0
    deletes = [r["status"] for r in sim.requests()[start:] if r["method"] == "DELETE"]
    assert deletes == [503, 503, 503, 404]
    assert "could not be deleted" not in result.stdout.str()


def test_ignored_delete_is_sent_again(gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x=ONE_TEST)
    sim.fault(kind="ignore_delete")
    before, start = ids(sim), len(sim.requests())
    assert gpu_run().ret == 0
    deletes = [r for r in sim.requests()[start:] if r["method"] == "DELETE"]
    assert len(deletes) == 2
    [instance] = new_instances(sim, before)
    assert instance["status"] == "terminated"


def test_delete_refused_for_good_fails_the_session_and_names_the_orphan(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=ONE_TEST)
    sim.fault(kind="http_error", op="delete", status=400, code="invalid_request", times=None)
    before = ids(sim)
    result = gpu_run()
    [instance] = new_instances(sim, before)
    try:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        assert outcomes(result) == {"passed": 1}
        result.stdout.fnmatch_lines(
            [f"gpu-cloud: these instances could not be deleted*: {instance['id']} *cleanup*"]
        )
    finally:
        sim.reset()
        sim.delete(instance["id"])


# Stray instances


def test_instance_whose_create_answer_is_unreadable_is_found_and_deleted(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_x=ONE_TEST)
    sim.fault(kind="override", op="create", fields={"id": "i-1; rm -rf ~"}, times=None)
    before = ids(sim)
    result = gpu_run("-rE")
    assert outcomes(result) == {"errors": 1}
    [instance] = new_instances(sim, before)
    assert instance["termination_reason"] == "deleted"
    assert "bad value at id" in error_line(result, "test_x.py::test_a")


# Signals


SLOW = """
import pathlib
import time

import pytest

pytestmark = pytest.mark.gpu("T4")


def test_1():
    pass


def test_2():
    (pathlib.Path.home() / "started").touch()
    time.sleep(60)


def test_3():
    pass
"""


def start_session(
    gpu_run: GpuRun, pytester: pytest.Pytester, *args: str
) -> subprocess.Popen[bytes]:
    pytester.makepyfile(test_x=SLOW)
    command = [sys.executable, "-m", "pytest", *gpu_run.args(), "--junitxml=out.xml", *args]
    out = (pytester.path / "out.txt").open("wb")
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=pytester.path)


def started(sim: Sim, before: set[str]) -> dict[str, Any] | None:
    """The new instance once its test marked its start, else None."""
    for instance in new_instances(sim, before):
        if instance["home"] and (Path(instance["home"]) / "started").exists():
            return instance
    return None


@pytest.mark.parametrize(
    "signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]], ids=["SIGTERM", "CI-cancel"]
)
def test_signal_mid_test_deletes_the_instance_and_exits_interrupted(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester, signals: list[signal.Signals]
) -> None:
    before = ids(sim)
    session = start_session(gpu_run, pytester)
    try:
        instance = wait_until(lambda: started(sim, before), "the test to start")
        for number in signals:
            session.send_signal(number)
            time.sleep(0.1)  # CI's SIGTERM comes while the teardown runs
        assert session.wait(60) == pytest.ExitCode.INTERRUPTED
    finally:
        session.kill()
    output = (pytester.path / "out.txt").read_text()
    assert "Traceback" not in output
    assert sim.instances()[-1]["id"] == instance["id"]
    assert instance["id"] not in [i["id"] for i in sim.live()]
    cases = {
        c.get("name"): c for c in ET.parse(pytester.path / "out.xml").getroot().iter("testcase")
    }
    assert set(cases) == {"test_1"}, "only the finished test has an outcome"


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def cleanup(
    pytester: pytest.Pytester, *args: str, answer: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_gpucloud cleanup`` in the project, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pytest_gpucloud", "cleanup", *args],
        cwd=pytester.path,
        input=answer,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sigkilled_session_leaves_an_instance_that_cleanup_finds_and_deletes(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUCLOUD_API_URL", sim.url)
    monkeypatch.setenv("GPUCLOUD_PROVIDER", "rest")
    project = project_label(pytester.path.name)
    before = ids(sim)
    session = start_session(gpu_run, pytester)
    try:
        instance = wait_until(lambda: started(sim, before), "the test to start")
    finally:
        session.kill()
    session.wait(60)
    try:
        assert instance["id"] in [i["id"] for i in sim.live()]
        not_yet = cleanup(pytester)
        assert (not_yet.returncode, not_yet.stdout.strip()) == (
            0,
            f"no instances of project {project} past their expiry",
        )
        declined = cleanup(pytester, "--older-than", "0", answer="n\n")
        assert declined.returncode == 0
        assert f"  {instance['id']}  T4:1  " in declined.stdout
        assert "nothing deleted" in declined.stdout
        assert instance["id"] in [i["id"] for i in sim.live()]
        done = cleanup(pytester, "--older-than", "0", "--yes")
        assert (done.returncode, done.stderr) == (0, "")
        assert f"deleted {instance['id']}" in done.stdout
        assert instance["id"] not in [i["id"] for i in sim.live()]
    finally:
        for left in new_instances(sim, before):
            sim.delete(left["id"])


def test_sigkilled_session_instance_is_deleted_by_its_max_lifetime(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    sim.configure(lifetime_scale=0.05, lifetime_check_interval_s=0.05)  # 60 s last 3 s
    before = ids(sim)
    session = start_session(gpu_run, pytester, "--gpu-max-lifetime", "60")
    try:
        [instance] = wait_until(lambda: new_instances(sim, before), "the instance")
    finally:
        session.kill()
    session.wait(60)
    wait_until(lambda: instance["id"] not in [i["id"] for i in sim.live()], "its lifetime")
    [ended] = new_instances(sim, before)
    assert ended["termination_reason"] == "max_lifetime"
