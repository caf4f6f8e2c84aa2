"""Each test's outcome, times and place, gathered from its reports for the CI outputs
(job summary, timeline, annotations)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# pytest's own representation of an error, as pytest-xdist sends it between processes.
from _pytest._code.code import ReprExceptionInfo, ReprFileLocation, ReprTracebackNative

from pytest_gpucloud.core.errors import PREFIX

#: Outcomes in the order the summary counts them; later ones are worse within a test.
OUTCOMES = ("passed", "failed", "error", "infrastructure error", "skipped", "xfailed", "xpassed")
_RANK = {
    "passed": 0,
    "xpassed": 1,
    "skipped": 2,
    "xfailed": 2,
    "error": 3,
    "failed": 4,
    "infrastructure error": 4,
}


@dataclass
class Record:
    """One test as its reports told it; ``instance`` is where a remote test ran
    (``T4 i-3f2a09c1``), None for a local test or one that never reached an instance."""

    nodeid: str
    outcome: str = "passed"
    start: float = 0.0
    stop: float = 0.0
    instance: str | None = None
    #: (path relative to the rootdir, 1-based line) of the test, and of its failure if known
    location: tuple[str, int] = ("", 0)
    crash: tuple[str, int] | None = None
    message: str = ""
    artifacts: str | None = None

    @property
    def remote(self) -> bool:
        return self.instance is not None or self.outcome == "infrastructure error"


@dataclass
class Outcomes:
    """The records of a session's tests, in the order they finished."""

    rootdir: Path
    records: dict[str, Record] = field(default_factory=dict)

    def add(self, report: pytest.TestReport) -> None:
        record = self.records.get(report.nodeid)
        if record is None:
            path, line, _ = report.location
            record = Record(report.nodeid, start=report.start, location=(path, (line or 0) + 1))
            self.records[report.nodeid] = record
        record.stop = report.stop
        instance = getattr(report, "gpu_instance", None)
        if instance:
            record.instance = instance
        artifacts = dict(report.user_properties).get("gpu_artifacts")
        if isinstance(artifacts, str):
            record.artifacts = self._shown(Path(artifacts))
        outcome = _outcome(report)
        if _RANK[outcome] > _RANK[record.outcome]:
            record.outcome = outcome
            record.message, record.crash = self._failure(report)

    def _failure(self, report: pytest.TestReport) -> tuple[str, tuple[str, int] | None]:
        if not report.failed:
            return "", None
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is None:
            text = str(report.longrepr)
            if text.startswith(PREFIX):  # all of it: it names the instance and the cause
                return text, None
            return text.strip().splitlines()[-1] if text.strip() else "", None
        path = Path(crash.path)
        if not path.is_relative_to(self.rootdir):
            return crash.message, None  # outside the project: the test's own line will do
        return crash.message, (self._shown(path), crash.lineno)

    def _shown(self, path: Path) -> str:
        """``path`` relative to the rootdir where it is inside (as CI's checkouts differ)."""
        return (
            path.relative_to(self.rootdir).as_posix()
            if path.is_relative_to(self.rootdir)
            else str(path)
        )


def _outcome(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.failed:
        if is_infrastructure_error(report):  # never a failure of the test itself
            return "infrastructure error"
        return "failed" if report.when == "call" else "error"
    return "skipped" if report.skipped else "passed"


def is_infrastructure_error(report: pytest.TestReport) -> bool:
    """A report the plugin made for a test that could not run or finish on an instance
    (a time limit passed in a test's body is that test's failure, as pytest-timeout's)."""
    return report.failed and report.when != "call" and str(report.longrepr).startswith(PREFIX)


def infrastructure_longrepr(item: pytest.Item, message: str) -> ReprExceptionInfo:
    """``message`` as an error report's text, its crash line at the test's own line.

    A plain string shows in full among the ERRORs, but pytest 8's short summary gives a
    string no reason (``ERROR test_x.py::test_a`` alone); its crash line's message is
    what every version prints there, and xdist carries this form between processes as it is.
    """
    lineno = (item.location[1] or 0) + 1
    return ReprExceptionInfo(
        reprtraceback=ReprTracebackNative([message + "\n"]),
        reprcrash=ReprFileLocation(str(item.path), lineno, message),
    )


def counts(records: Iterable[Record]) -> dict[str, int]:
    """Tests per outcome, in :data:`OUTCOMES` order, only those that occurred."""
    counted = Counter(r.outcome for r in records)
    return {outcome: counted[outcome] for outcome in OUTCOMES if counted[outcome]}
