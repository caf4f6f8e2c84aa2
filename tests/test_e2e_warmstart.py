"""End-to-end: instances start while local tests run (--gpu-start), their status lines, and
where each remote test ran in -v lines."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from tests.cloud import GpuRun, Sim

# Local tests that take longer than the boot, then a gpu test; the last local test notes
# when it ended, which is before the gpu test starts.
LOCAL_THEN_GPU = """
import pathlib
import time

import pytest

@pytest.mark.parametrize("n", range({locals}))
def test_local(n):
    time.sleep({seconds})
    pathlib.Path("local-ended").write_text(repr(time.time()))

@pytest.mark.gpu("T4")
def test_gpu():
    pass
"""


def _new(sim: Sim, before: set[str]) -> list[dict[str, Any]]:
    return [i for i in sim.instances() if i["id"] not in before]


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _local_ended(pytester: pytest.Pytester) -> float:
    return float((pytester.path / "local-ended").read_text())


def test_instance_boots_while_local_tests_run_and_says_so(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    sim.configure(boot_delay_s=1.5)
    pytester.makepyfile(LOCAL_THEN_GPU.format(locals=5, seconds=0.5))
    before = {i["id"] for i in sim.instances()}
    # no earlier run: jit knows no durations and starts the instance at once
    result = gpu_run("-v", "-rA")
    result.assert_outcomes(passed=6)
    (instance,) = _new(sim, before)
    assert _time(instance["running_at"]) < _local_ended(pytester), "the gpu test waited"
    label = f"T4 {instance['id']}"
    result.stdout.fnmatch_lines(
        [
            "gpu-cloud: T4 requested for T4",
            f"gpu-cloud: {label} booting in eu-central-1 at $0.53/h",
            f"gpu-cloud: {label} ready in * s*",
            f"gpu-cloud: {label} busy with *::test_gpu",
            f"gpu-cloud: {label} released * s after its request; * s billed, $0.0*",
        ]
    )
    result.stdout.fnmatch_lines([f"*::test_gpu PASSED [[]{label}[]]*"])
    # the summary at the end, which tools read, keeps pytest's own form
    result.stdout.fnmatch_lines(["*short test summary info*", "PASSED test_*.py::test_gpu"])
    # local test lines name no instance
    result.stdout.fnmatch_lines(["*::test_local[[]0[]] PASSED *"])
    result.stdout.no_fnmatch_line("*::test_local*PASSED [[]T4*")


def test_lazy_starts_at_first_use(gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LOCAL_THEN_GPU.format(locals=1, seconds=0.2))
    before = {i["id"] for i in sim.instances()}
    gpu_run("--gpu-start", "lazy").assert_outcomes(passed=2)
    (instance,) = _new(sim, before)
    assert _time(instance["created_at"]) > _local_ended(pytester)


def test_jit_waits_for_its_time_and_a_test_that_comes_early_does_not_wait_for_it(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    module = pytester.makepyfile(LOCAL_THEN_GPU.format(locals=1, seconds=0.2))
    # earlier runs say the local test takes ten minutes and a T4 boots in a second
    cache = pytester.path / ".pytest_cache" / "v" / "gpucloud"
    cache.mkdir(parents=True)
    (cache / "durations").write_text(json.dumps({f"{module.name}::test_local[0]": 600.0}))
    (cache / "boot").write_text(json.dumps({"T4": 1.0}))
    before = {i["id"] for i in sim.instances()}
    gpu_run().assert_outcomes(passed=2)
    (instance,) = _new(sim, before)  # the timer never made a second one
    assert _time(instance["created_at"]) > _local_ended(pytester)
    # this run's durations replace the earlier ones
    durations = json.loads((cache / "durations").read_text())
    assert durations[f"{module.name}::test_local[0]"] < 60
    assert 0 < json.loads((cache / "boot").read_text())["T4"] < 60
