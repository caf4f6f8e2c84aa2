"""Read-ahead of quick remote tests (transport/worker_link.py): the runs of the planned next
tests go out before the current test's results are in, yet every test is reported once,
with its own outcome, and a session that may stop early sends nothing ahead.

The remote tests append their names to a file outside the workspace (sim instances are
processes on this machine), so each test can see what ran on the instance and how often.
Whether a test is quick enough to read ahead of depends on this machine's speed; the tests
that count runs make every test quick (``always_quick``), so what goes ahead is fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gpucloud.transport import worker_link
from tests.cloud import GpuRun

TESTS = """
import pytest

pytestmark = pytest.mark.gpu("T4")


def ran(name):
    with open({log!r}, "a") as f:
        f.write(name + "\\n")


@pytest.mark.parametrize("i", range(12))
def test_q(i):
    ran(f"q{{i}}")
    assert i != {failing}
"""


def _project(pytester: pytest.Pytester, *, failing: int = -1) -> Path:
    log = pytester.path.parent / f"{pytester.path.name}-ran.txt"
    pytester.makepyfile(test_quick=TESTS.format(log=str(log), failing=failing))
    return log


def _ran(log: Path) -> list[str]:
    return log.read_text().split()


@pytest.fixture
def always_quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test counts as quick: the planned next runs always go ahead (where allowed)."""
    monkeypatch.setattr(worker_link, "READ_AHEAD_BELOW_S", float("inf"))


def test_every_test_runs_once_in_order_with_its_own_outcome(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    log = _project(pytester, failing=7)
    result = gpu_run("-v")
    result.assert_outcomes(passed=11, failed=1)
    result.stdout.fnmatch_lines(["*test_q?6? PASSED*", "*test_q?7? FAILED*", "*test_q?8? PASSED*"])
    assert _ran(log) == [f"q{i}" for i in range(12)]


@pytest.mark.usefixtures("always_quick")
def test_exitfirst_sends_nothing_ahead(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    log = _project(pytester, failing=3)
    result = gpu_run("-x")
    result.assert_outcomes(passed=3, failed=1)
    assert _ran(log) == ["q0", "q1", "q2", "q3"], "no test after the failure ran remotely"


@pytest.mark.usefixtures("always_quick")
def test_runs_out_of_the_planned_order_get_their_own_results(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    # The plan is made in collection order; this conftest then reverses the second half of
    # the run order, so the runs read ahead of it are not the ones asked for: dropped.
    log = _project(pytester, failing=9)
    pytester.makeconftest(
        """
        import pytest

        @pytest.hookimpl(trylast=True)
        def pytest_collection_finish(session):
            session.items[6:] = session.items[:5:-1]
        """
    )
    result = gpu_run("-v")
    result.assert_outcomes(passed=11, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_q?11? PASSED*", "*test_q?10? PASSED*", "*test_q?9? FAILED*"]
    )
    ran = _ran(log)
    # Read ahead in the planned order, q6 to q11 included, while q0 to q5 ran; those results
    # were dropped when q11 was asked for out of turn, and q11 to q6 ran again, as asked.
    assert ran[:12] == [f"q{i}" for i in range(12)]
    assert sorted(ran[12:]) == sorted(f"q{i}" for i in range(6, 12))
