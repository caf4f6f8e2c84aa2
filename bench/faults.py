"""Reliability under faults: the fault matrix of issue 5, each fault injected 20 times.

Every repetition is a real pytest session (``--gpu-cloud``, rest provider) against a
simulated cloud, with one fault injected through the sim (or, for the signals, sent to the
session's process). Sessions run in a pool of processes, each with a sim of its own (its
fault book is its own), in-process (``pytest.main`` in the main thread: no start-up cost;
SIGTERM and SIGINT are sent to that process), and as a subprocess for SIGKILL.

A session survives its fault when it ends as it should: the expected outcomes, the cause
named in each infrastructure error, the expected exit status, and no instance alive after
it (for SIGKILL: the instance found by ``cleanup`` before its lifetime ends, and gone at
its lifetime). The baseline of each figure is its denominator, counted in the same run.
The delete latency after a signal is compared with the latency after the last test of a
session without faults (layer 1 of the teardown).

Run: ``python bench/faults.py [REPEATS]``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from pytest_gpucloud.cli import cleanup
from pytest_gpucloud.core.wire import LIVE_STATUSES
from pytest_gpucloud.sim import SimConfig, SimServer

REPEATS = 20
CONTROL_REPEATS = 5  # the sessions without a fault: the baseline of the delete latency
WORKERS = 6
SIGNAL_TARGET_S = 2.0
NOTES: list[str] = []

Ending = Literal["normal", "sigterm", "ci-cancel", "sigkill"]

TESTS = """
import os
import pathlib
import signal
import time

import pytest

pytestmark = pytest.mark.gpu("T4")


def test_1():
    pass


def test_2():
    {body}


def test_3():
    pass
"""
MARK = '(pathlib.Path.home() / "{name}").touch()'


def tests(body: str) -> str:
    return textwrap.dedent(TESTS).format(body=body)


@dataclass(frozen=True)
class Scenario:
    """One fault: how to inject it and how a session that survives it ends."""

    name: str
    source: str
    expect: dict[str, int]
    faults: tuple[dict[str, Any], ...] = ()
    args: tuple[str, ...] = ()
    causes: tuple[str, ...] = ()  # in the infrastructure errors
    exit: int = 1
    instances: int = 1
    ending: Ending = "normal"


HANGS = "time.sleep(60)"
SCENARIOS = (
    Scenario("none (control)", tests("pass"), {"passed": 3}, exit=0),
    Scenario(
        "429 + Retry-After on create",
        tests("pass"),
        {"passed": 3},
        ({"kind": "http_error", "op": "create", "status": 429, "code": "rate_limited",
          "retry_after": 1},),
        exit=0,
    ),
    Scenario(
        "500 after the instance was created",
        tests("pass"),
        {"passed": 3},
        ({"kind": "http_error_after", "op": "create", "status": 500},),
        exit=0,
    ),
    Scenario(
        "out_of_capacity on every offer",
        tests("pass"),
        {"error": 3},
        ({"kind": "http_error", "op": "create", "status": 503, "code": "out_of_capacity",
          "times": None},),
        causes=("out of capacity",),
        instances=0,
    ),
    Scenario(
        "boot that never completes",
        tests("pass"),
        {"error": 3},
        ({"kind": "boot_never"},),
        ("--gpu-boot-timeout", "1"),
        ("did not boot within 1 s",),
    ),
    Scenario(
        "SSH connection refused",
        tests("pass"),
        {"error": 3},
        ({"kind": "ssh_refuse"},),
        ("--gpu-boot-timeout", "1"),
        ("connection refused",),
    ),
    Scenario(
        "SSH connection dropped mid-test",
        tests(f"{MARK.format(name='drop-now')}; {HANGS}"),
        {"passed": 2, "error": 1},
        ({"kind": "drop_ssh", "on_file": "drop-now"},),
        causes=("SSH connection lost",),
        instances=2,
    ),
    Scenario(
        "remote worker killed mid-test",
        tests("os.kill(os.getpid(), signal.SIGKILL)"),
        {"passed": 2, "error": 1},
        causes=("killed by SIGKILL",),
    ),
    Scenario(
        "test exceeding its timeout",
        tests(HANGS),
        {"passed": 2, "failure": 1},  # in its body: the test's own failure, as a local limit
        args=("--gpu-timeout", "1"),
        causes=("exceeded its time limit of 1 s",),
    ),
    Scenario(
        "delete answering 503 three times, then 404",
        tests("pass"),
        {"passed": 3},
        ({"kind": "http_error_after", "op": "delete", "status": 503},
         {"kind": "http_error", "op": "delete", "status": 503, "code": "internal", "times": 2}),
        exit=0,
    ),
    Scenario(
        "instance preempted mid-test",
        tests(f"{MARK.format(name='lose-me')}; {HANGS}"),
        {"passed": 2, "error": 1},
        ({"kind": "preempt", "on_file": "lose-me"},),
        causes=("stopped while running",),
        instances=2,
    ),
    Scenario(
        "SIGTERM to pytest mid-test",
        tests(f"{MARK.format(name='started')}; {HANGS}"),
        {"passed": 1},
        exit=int(pytest.ExitCode.INTERRUPTED),
        ending="sigterm",
    ),
    Scenario(
        "CI cancel: SIGINT, then SIGTERM",
        tests(f"{MARK.format(name='started')}; {HANGS}"),
        {"passed": 1},
        exit=int(pytest.ExitCode.INTERRUPTED),
        ending="ci-cancel",
    ),
    Scenario(
        "SIGKILL to pytest mid-test",
        tests(f"{MARK.format(name='started')}; {HANGS}"),
        {},
        args=("--gpu-max-lifetime", "60"),
        exit=-int(signal.SIGKILL),
        ending="sigkill",
    ),
)  # fmt: skip


@dataclass
class Outcome:
    """What one session did."""

    scenario: str
    survived: bool
    selected: int  # tests whose outcome counts (sessions that ran to their end)
    one_outcome: int
    created: int
    alive_after: int
    delete_after_s: float | None  # from the signal, or from the last test's end
    problems: list[str] = field(default_factory=list)


class _Sim:
    """This process's simulated cloud and its admin API."""

    def __init__(self) -> None:
        self.api_key = secrets.token_urlsafe(16)
        # Lifetimes pass 20x faster: --gpu-max-lifetime 60 lasts 3 s, the default hours.
        self.server = SimServer(
            SimConfig(
                api_key=self.api_key,
                boot_delay_s=0.05,
                lifetime_scale=0.05,
                lifetime_check_interval_s=0.05,
            )
        )
        self.url = self.server.start()
        # A signal meant for a session that has just ended must not end this process.
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda signum, frame: None)
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30
        )

    def get(self, path: str) -> list[dict[str, Any]]:
        response = self.http.get(path)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result


_SIM: _Sim | None = None


def _sim() -> _Sim:
    global _SIM
    if _SIM is None:
        _SIM = _Sim()
    return _SIM


class _LastTest:
    """A local plugin: when the session's last test ended."""

    def __init__(self) -> None:
        self.ended = 0.0

    def pytest_runtest_logfinish(self) -> None:
        self.ended = time.time()


def run_one(index: int, repeat: int) -> Outcome:
    """One session of ``SCENARIOS[index]`` in this pool process; a harness error counts as
    a fault not survived."""
    try:
        return _run_one(index, repeat)
    except Exception as exc:
        return Outcome(SCENARIOS[index].name, False, 0, 0, 0, 0, None, [f"{exc!r}"])


def _run_one(index: int, repeat: int) -> Outcome:
    scenario = SCENARIOS[index]
    sim = _sim()
    sim.http.delete("/_sim/faults").raise_for_status()
    if scenario.faults:
        sim.http.post("/_sim/faults", json={"faults": list(scenario.faults)}).raise_for_status()
    before = {i["id"] for i in sim.get("/_sim/instances")}
    requests_before = len(sim.get("/_sim/requests"))
    with tempfile.TemporaryDirectory(prefix=f"faults-{index}-{repeat}-") as tmp:
        project = Path(tmp)
        (project / "test_x.py").write_text(scenario.source)
        (project / "pytest.ini").write_text("[pytest]\n")
        args = [
            *("--gpu-cloud", "--gpu-provider", "rest", "--gpu-api-url", sim.url),
            *(
                "-p",
                "no:cacheprovider",
                "-p",
                "no:randomly",
                "--import-mode=importlib",
                "-q",
                "-rE",
            ),
            # Plugins of this venv the sessions do not need (the sim's instances share it),
            # and the gc.collect() of every session end (a pool process has a large heap).
            *("-p", "no:hypothesispytest", "-p", "no:anyio", "-p", "no:xdist"),
            *("-p", "no:unraisableexception"),
            *(f"--junitxml={project / 'report.xml'}", *scenario.args),
        ]
        os.environ["GPUCLOUD_API_KEY"] = sim.api_key
        signalled, listed = 0.0, None
        if scenario.ending == "sigkill":
            code, output, listed = _killed(project, args, sim, before)
        else:
            code, output, signalled = _in_process(scenario, project, args, sim, before)
        junit = _junit(project / "report.xml") if scenario.ending != "sigkill" else {}
    problems: list[str] = []
    if code != scenario.exit:
        problems.append(f"exit {code} instead of {scenario.exit}")
    counts: dict[str, int] = {}
    for kinds in junit.values():
        for kind in kinds or ["passed"]:
            counts[kind] = counts.get(kind, 0) + 1
    if counts != scenario.expect:
        problems.append(f"outcomes {counts} instead of {scenario.expect}")
    problems += [f"no {cause!r} in the output" for cause in scenario.causes if cause not in output]
    if scenario.ending == "sigkill":
        problems += _reaped(sim, before, listed)
    alive = [i for i in sim.get("/_sim/instances") if i["id"] not in before]
    created = len(alive)
    alive = [i for i in alive if i["status"] in LIVE_STATUSES]
    if created != scenario.instances:
        problems.append(f"{created} instances instead of {scenario.instances}")
    if alive:
        problems.append(f"alive after: {[i['id'] for i in alive]}")
        for instance in alive:  # leave the next session a clean cloud
            sim.http.delete(f"/v1/instances/{instance['id']}")
    deletes = [
        _seconds(r["time"])
        for r in sim.get("/_sim/requests")[requests_before:]
        if r["method"] == "DELETE"
    ]
    latency = max(deletes) - signalled if deletes and signalled else None
    counted = scenario.ending == "normal"
    return Outcome(
        scenario.name,
        not problems,
        len(junit) if counted else 0,
        sum(len(kinds) <= 1 for kinds in junit.values()) if counted else 0,
        created,
        len(alive),
        latency,
        problems,
    )


def _in_process(
    scenario: Scenario, project: Path, args: list[str], sim: _Sim, before: set[str]
) -> tuple[int, str, float]:
    """Run the session here; for a signal ending, a thread sends this process the signals
    once the test has started (pytest runs in the main thread, as on a CI runner)."""
    last = _LastTest()
    out = io.StringIO()
    done = threading.Event()
    sent: list[float] = []
    sender = threading.Thread(
        target=_send_signals, args=(scenario.ending, sim, before, done, sent), daemon=True
    )
    cwd = os.getcwd()
    os.chdir(project)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if scenario.ending != "normal":
                sender.start()
            code = int(pytest.main([*args, str(project)], plugins=[last]))
    finally:
        done.set()
        os.chdir(cwd)
    if scenario.ending != "normal":
        sender.join()
        if not sent:
            return code, out.getvalue() + "\nthe test never started", 0.0
        return code, out.getvalue(), sent[0]
    return code, out.getvalue(), last.ended


def _send_signals(
    ending: Ending, sim: _Sim, before: set[str], done: threading.Event, sent: list[float]
) -> None:
    if not _wait_started(sim, before, done.is_set):
        return
    sent.append(time.time())
    os.kill(os.getpid(), signal.SIGINT if ending == "ci-cancel" else signal.SIGTERM)
    if ending == "ci-cancel":
        time.sleep(0.1)  # the SIGTERM comes while the teardown runs
        os.kill(os.getpid(), signal.SIGTERM)


def _killed(project: Path, args: list[str], sim: _Sim, before: set[str]) -> tuple[int, str, bool]:
    """Run the session as a process and SIGKILL it once its instance exists (to catch it
    before its short lifetime ends); then does ``cleanup`` list the instance?"""
    log = project / "output.txt"
    with log.open("wb") as out:
        session = subprocess.Popen(
            [sys.executable, "-m", "pytest", *args], cwd=project, stdout=out, stderr=out
        )
        try:
            _wait_started(sim, before, lambda: session.poll() is not None, created_only=True)
        finally:
            session.kill()
            code = session.wait(60)
    return code, log.read_text(errors="replace"), _cleanup_lists(project, sim)


def _wait_started(
    sim: _Sim, before: set[str], ended: Callable[[], bool], created_only: bool = False
) -> bool:
    """Wait until the session's test marked its start (or its instance exists)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ended():
        for instance in sim.get("/_sim/instances"):
            home = instance["home"]
            if instance["id"] in before:
                continue
            if created_only or (home and (Path(home) / "started").exists()):
                return True
        time.sleep(0.02)
    return False


def _cleanup_lists(project: Path, sim: _Sim) -> bool:
    """Does ``cleanup --older-than 0`` list the killed session's instance (answer: no)?"""
    os.environ.update(GPUCLOUD_API_URL=sim.url, GPUCLOUD_PROVIDER="rest")
    out = io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO("n\n")
    try:
        with contextlib.redirect_stdout(out):
            cleanup.main(["--older-than", "0"], cwd=project)
    finally:
        sys.stdin = stdin
        for name in ("GPUCLOUD_API_URL", "GPUCLOUD_PROVIDER"):
            os.environ.pop(name, None)
    return "1 instance(s) of project" in out.getvalue()


def _reaped(sim: _Sim, before: set[str], listed: bool | None) -> list[str]:
    """The killed session's instance must go at its lifetime."""
    problems = [] if listed else ["cleanup did not list the instance"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        mine = [i for i in sim.get("/_sim/instances") if i["id"] not in before]
        if mine and all(i["status"] == "terminated" for i in mine):
            reasons = {i["termination_reason"] for i in mine}
            return problems + ([] if reasons == {"max_lifetime"} else [f"ended: {reasons}"])
        time.sleep(0.05)
    return [*problems, "not reaped at its lifetime"]


def _junit(path: Path) -> dict[str, list[str]]:
    """nodeid -> the outcomes its testcase holds beyond passing (error, failure, skipped)."""
    if not path.exists():
        return {}
    cases: dict[str, list[str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        cases.setdefault(name, []).extend(
            child.tag for child in case if child.tag in ("error", "failure", "skipped")
        )
    return cases


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run_all(repeats: int) -> list[Outcome]:
    jobs = [
        (index, repeat)
        for repeat in range(repeats)
        for index in range(len(SCENARIOS))
        if index > 0 or repeat < CONTROL_REPEATS
    ]
    # The slowest first, so that no process is left with them at the end.
    jobs.sort(key=lambda job: SCENARIOS[job[0]].ending != "sigkill")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context) as pool:
        return list(pool.map(run_one, *zip(*jobs, strict=True)))


def main(repeats: int = REPEATS) -> list[dict[str, object]]:
    started = time.perf_counter()
    outcomes = run_all(repeats)
    seconds = time.perf_counter() - started
    faulty = [o for o in outcomes if o.scenario != SCENARIOS[0].name]
    survived = sum(o.survived for o in faulty)
    selected = sum(o.selected for o in outcomes)
    one = sum(o.one_outcome for o in outcomes)
    created = sum(o.created for o in outcomes)
    alive = sum(o.alive_after for o in outcomes)
    signal_s = max((o.delete_after_s or 0.0) for o in outcomes if o.scenario in _SIGNALLED)
    normal_s = max((o.delete_after_s or 0.0) for o in outcomes if o.scenario == SCENARIOS[0].name)
    lines = [f"{len(outcomes)} sessions in {seconds:.0f} s ({WORKERS} processes)"]
    for scenario in SCENARIOS:
        mine = [o for o in outcomes if o.scenario == scenario.name]
        ok = sum(o.survived for o in mine)
        lines.append(f"  {scenario.name}: {ok}/{len(mine)} survived")
        for problem in sorted({p for o in mine for p in o.problems})[:3]:
            lines.append(f"    {problem}")
    print("\n".join(lines))
    NOTES.append(
        f"{len(outcomes)} sessions ({repeats} per fault, {CONTROL_REPEATS} without one) in "
        f"{seconds:.0f} s on {WORKERS} processes. Per fault, sessions that survived: "
        + "; ".join(
            f"{s.name} {sum(o.survived for o in mine)}/{len(mine)}"
            for s in SCENARIOS
            if (mine := [o for o in outcomes if o.scenario == s.name])
        )
        + ". Tests with one outcome are counted over the sessions that run to their end "
        "(an interrupted or killed session's unfinished tests have none, as in pytest)."
    )
    return [
        {
            "name": "faults survived / injected",
            "value": survived,
            "baseline": len(faulty),
            "ratio": round(survived / len(faulty), 4),
            "target": "100%",
            "ok": survived == len(faulty),
            "unit": "sessions",
        },
        {
            "name": "tests with exactly one outcome / selected",
            "value": one,
            "baseline": selected,
            "ratio": round(one / selected, 4) if selected else None,
            "target": "100%",
            "ok": one == selected,
            "unit": "tests",
        },
        {
            "name": "instances alive after / created",
            "value": alive,
            "baseline": created,
            "ratio": round(alive / created, 4) if created else None,
            "target": 0,
            "unit": "instances",
        },
        {
            "name": "last delete request after SIGTERM / SIGINT+SIGTERM, worst "
            "(baseline: after the last test, no fault)",
            "value": round(signal_s, 3),
            "baseline": round(normal_s, 3),
            "ratio": round(signal_s / normal_s, 2) if normal_s else None,
            "target": SIGNAL_TARGET_S,
            "unit": "s",
        },
    ]


_SIGNALLED = {s.name for s in SCENARIOS if s.ending in ("sigterm", "ci-cancel")}


if __name__ == "__main__":
    for row in main(int(sys.argv[1]) if len(sys.argv) > 1 else REPEATS):
        print(row)
