"""Fan-out over instances (xdist) and the start modes (``--gpu-start``), on the sim.

The sim runs in a process of its own (``simcloud.py``), as a cloud's API would, and the
sessions reach it with ``--gpu-provider rest``; its boot delay is set through its admin API.

Fan-out: eight gpu tests of 2 s each, sim boot 3 s, run with ``pytest -n N
--gpu-max-instances N`` for N = 1, 2, 4. Ideal: ``fixed + boot + work / N``, where ``fixed``
is measured in the same run: the same session with 0-second tests and no boot delay (xdist
start, the sim, connect, code sync, worker start, teardown). Target: wall time at most
1.15 x ideal.

Start modes: ten 1-second local tests, then five 1-second gpu tests, sim boot 5 s, one
session per mode (eager, jit, lazy) after one run that leaves the durations and boot times
in pytest's cache, as any earlier run does. Baseline: the local work alone, measured (the
same session with ``-m "not gpu"``), plus the gpu tests' own 5 s. Targets: the best mode
at most 1 s over the baseline; jit's billed idle seconds at most 20% of eager's. Idle
seconds are those an instance is up (ready) but runs no test, before its first test (from
``--gpu-report``: the instance's ``ready_at`` and its first test's ``started_at``): that wait
is what a start mode decides; the boot, the gaps between tests and the worker's goodbye
before the delete are billed alike in every mode (the notes give the totals).

Run: ``python bench/fanout.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from simcloud import SimProcess

FANOUT_TESTS = 8
FANOUT_TEST_S = 2.0
FANOUT_BOOT_S = 3.0
FANOUT_TARGET = 1.15
LOCAL_TESTS = 10
GPU_TESTS = 5
TEST_S = 1.0
START_BOOT_S = 5.0
START_SLACK_S = 1.0
IDLE_TARGET = 0.2
NOTES: list[str] = []

FANOUT = """
import time
import pytest

@pytest.mark.gpu("T4")
@pytest.mark.parametrize("i", range({tests}))
def test_gpu(i):
    time.sleep({seconds})
"""

START = """
import time
import pytest

@pytest.mark.parametrize("i", range({local}))
def test_local(i):
    time.sleep({seconds})

@pytest.mark.gpu("T4")
@pytest.mark.parametrize("i", range({gpu}))
def test_gpu(i):
    time.sleep({seconds})
"""


def pytest_wall(sim: SimProcess, project: Path, boot_s: float, *args: str) -> float:
    """Seconds one ``pytest --gpu-cloud`` process takes in ``project`` with this boot delay
    of the sim; a failed run raises."""
    answer = httpx.put(
        f"{sim.url}/_sim/config",
        json={"boot_delay_s": boot_s},
        headers={"Authorization": f"Bearer {sim.api_key}"},
    )
    answer.raise_for_status()
    command = [
        *(sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"),
        *("--gpu-cloud", "--gpu-provider", "rest", *args),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=project, env=sim.env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"pytest {' '.join(args)} exited {done.returncode}: " + "\n".join(tail))
    return wall


def project(root: Path, name: str, source: str) -> Path:
    path = root / name
    path.mkdir()
    # hypothesis, installed here for the project's own tests, imports itself at every
    # session's end (0.6 s, here and on the instance): off, in the baseline too
    (path / "pytest.ini").write_text("[pytest]\naddopts = -p no:hypothesispytest\n")
    (path / "test_work.py").write_text(textwrap.dedent(source))
    return path


def idle_seconds(report: Path) -> tuple[float, float]:
    """Billed seconds in which instances were up but ran no test: before their first test
    (what the start mode decides), and in all (ready until deleted, less the tests)."""
    data = json.loads(report.read_text())
    busy: dict[str, float] = {}
    first: dict[str, float] = {}
    for test in data["tests"]:
        busy[test["instance"]] = busy.get(test["instance"], 0.0) + test["seconds"]
        first[test["instance"]] = min(first.get(test["instance"], math.inf), test["started_at"])
    instances = data["instances"]
    before = sum(max(0.0, first[i["id"]] - i["ready_at"]) for i in instances if i["id"] in first)
    total = sum(i["deleted_at"] - i["ready_at"] - busy.get(i["id"], 0.0) for i in instances)
    return float(before), float(total)


def fanout(sim: SimProcess, root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    work = project(root, "fanout", FANOUT.format(tests=FANOUT_TESTS, seconds=FANOUT_TEST_S))
    empty = project(root, "fanout-fixed", FANOUT.format(tests=FANOUT_TESTS, seconds=0))
    for workers in (1, 2, 4):
        xdist = ["-n", str(workers), "--gpu-max-instances", str(workers)]
        name = f"-n {workers}: {FANOUT_TESTS} x {FANOUT_TEST_S:g} s gpu tests"
        name += f", boot {FANOUT_BOOT_S:g} s"
        try:
            fixed = pytest_wall(sim, empty, 0, *xdist)
            wall = pytest_wall(sim, work, FANOUT_BOOT_S, *xdist)
        except RuntimeError as exc:
            NOTES.append(f"fan-out with -n {workers} did not run: {exc}")
            rows.append({"name": name, "value": None, "unit": "s", "ok": False})
            continue
        ideal = fixed + FANOUT_BOOT_S + FANOUT_TESTS * FANOUT_TEST_S / workers
        ratio = wall / ideal
        rows.append(
            {
                "name": f"{name}: wall (baseline: ideal = fixed {fixed:.1f} s + boot + work/N)",
                "value": round(wall, 2),
                "baseline": round(ideal, 2),
                "ratio": round(ratio, 3),
                "target": f"ratio <= {FANOUT_TARGET}",
                "unit": "s",
                "ok": ratio <= FANOUT_TARGET,
            }
        )
    return rows


def start_modes(sim: SimProcess, root: Path) -> list[dict[str, Any]]:
    work = project(root, "start", START.format(local=LOCAL_TESTS, gpu=GPU_TESTS, seconds=TEST_S))
    local = pytest_wall(sim, work, START_BOOT_S, "-m", "not gpu")
    baseline = local + GPU_TESTS * TEST_S
    pytest_wall(sim, work, START_BOOT_S, "--gpu-start", "eager")  # the history
    walls: dict[str, float] = {}
    idle: dict[str, float] = {}
    for mode in ("eager", "jit", "lazy"):
        report = work / f"report-{mode}.json"
        walls[mode] = pytest_wall(
            sim, work, START_BOOT_S, "--gpu-start", mode, f"--gpu-report={report}"
        )
        idle[mode], total = idle_seconds(report)
        NOTES.append(
            f"--gpu-start {mode}: {idle[mode]:.2f} s idle before the first test, "
            f"{total:.2f} s idle in all (the rest: between tests and before the delete)"
        )
    rows: list[dict[str, Any]] = [
        {
            "name": f"--gpu-start {mode}: wall, {LOCAL_TESTS} s local then {GPU_TESTS} s gpu, "
            f"boot {START_BOOT_S:g} s (baseline: local work alone + gpu work)",
            "value": round(walls[mode], 2),
            "baseline": round(baseline, 2),
            "ratio": round(walls[mode] / baseline, 3),
            "target": round(baseline + START_SLACK_S, 2),
            "unit": "s",
        }
        for mode in walls
    ]
    best = min(walls, key=walls.__getitem__)
    NOTES.append(f"best start mode: {best} ({walls[best]:.2f} s; baseline {baseline:.2f} s)")
    ratio = idle["jit"] / idle["eager"] if idle["eager"] > 0 else 0.0
    rows.append(
        {
            "name": "--gpu-start jit: billed seconds idle before the first test "
            "(baseline: eager's)",
            "value": round(idle["jit"], 2),
            "baseline": round(idle["eager"], 2),
            "ratio": round(ratio, 3),
            "target": f"ratio <= {IDLE_TARGET}",
            "unit": "s",
            "ok": ratio <= IDLE_TARGET,
        }
    )
    return rows


def main() -> list[dict[str, Any]]:
    NOTES.clear()
    with tempfile.TemporaryDirectory(prefix="gpucloud-fanout-") as tmp, SimProcess() as sim:
        root = Path(tmp)
        rows = start_modes(sim, root) + fanout(sim, root)
    for row in rows:
        print(
            f"{row['name']}: {row.get('value')} {row.get('unit', '')} (baseline "
            f"{row.get('baseline')}, ratio {row.get('ratio')}, target {row.get('target')})"
        )
    for note in NOTES:
        print(note)
    return rows


if __name__ == "__main__":
    main()
