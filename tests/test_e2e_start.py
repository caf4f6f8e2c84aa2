"""End-to-end: the start of an instance's session. Without a setup command the worker starts
(imports pytest) while the code is still syncing, and collects once the sync is done; with
one, it starts after the setup. The ``--gpu-report`` JSON breaks the start down by phase."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import pytest

from tests.cloud import GpuRun, Sim

# Big enough that the sync lasts well past the worker's launch.
PAYLOAD_BYTES = 24 << 20

PROJECT = """
import pathlib

import pytest

@pytest.mark.gpu("T4")
def test_sees_the_whole_workspace():
    assert pathlib.Path("weights.bin").stat().st_size == {size}
"""

PHASES = ("boot", "connect", "sync", "prepare", "worker_start", "collect", "first_test", "ready")


def _at(command: dict[str, Any], key: str) -> float:
    return datetime.fromisoformat(command[key].replace("Z", "+00:00")).timestamp()


def _session(gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester, *args: str) -> Any:
    pytester.makepyfile(PROJECT.format(size=PAYLOAD_BYTES))
    (pytester.path / "weights.bin").write_bytes(os.urandom(PAYLOAD_BYTES))
    before = {i["id"] for i in sim.instances()}
    gpu_run("--gpu-report", "report.json", *args).assert_outcomes(passed=1)
    (instance,) = [i for i in sim.instances() if i["id"] not in before]
    commands = instance["commands"]
    receiver = next(c for c in commands if "gpucloud receive" in c["command"])
    worker = next(c for c in commands if 'run_module("gpucloud_remote"' in c["command"])
    report = json.loads((pytester.path / "report.json").read_text())
    return commands, receiver, worker, report["instances"][0]["phases"]


def test_without_setup_the_worker_starts_during_the_sync(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    _, receiver, worker, phases = _session(gpu_run, sim, pytester)
    assert _at(worker, "started_at") < _at(receiver, "ended_at")
    assert all(isinstance(phases[name], float) for name in PHASES), phases
    assert phases["ready_to_first_result"] == pytest.approx(
        phases["ready"] + phases["first_test"], abs=2e-3
    )
    # the overlap: the steps add up to more than the wall time they took
    steps = sum(phases[name] for name in ("connect", "sync", "prepare", "worker_start", "collect"))
    assert phases["ready"] < steps


def test_with_setup_the_worker_starts_after_it(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    commands, receiver, worker, phases = _session(
        gpu_run, sim, pytester, "--gpu-setup", "echo set up"
    )
    setup = next(c for c in commands if "echo set up" in c["command"])
    assert _at(receiver, "ended_at") <= _at(setup, "started_at")
    assert _at(setup, "ended_at") <= _at(worker, "started_at")
    assert phases["ready_to_first_result"] == pytest.approx(
        phases["ready"] + phases["first_test"], abs=2e-3
    )
