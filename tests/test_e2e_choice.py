"""End-to-end: choosing hardware against the simulated cloud: failover, regions, budget,
sharing a running instance, early release, plan mode and the JSON cost report."""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime
from typing import Any

import pytest

from tests.cloud import GpuRun, Sim


def _new(sim: Sim, before: set[str]) -> list[dict[str, Any]]:
    return [i for i in sim.instances() if i["id"] not in before]


def _ids(sim: Sim) -> set[str]:
    return {i["id"] for i in sim.instances()}


def _creates(sim: Sim, since: int) -> list[dict[str, Any]]:
    return [
        r for r in sim.requests()[since:] if r["method"] == "POST" and r["path"] == "/v1/instances"
    ]


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _seed_cache(
    pytester: pytest.Pytester, tests: dict[str, float], boots: dict[str, float]
) -> None:
    """What earlier runs would have left in pytest's cache."""
    cache = pytester.path / ".pytest_cache" / "v" / "gpucloud"
    cache.mkdir(parents=True)
    (cache / "durations").write_text(json.dumps(tests))
    (cache / "boot").write_text(json.dumps(boots))


def test_failover_retries_and_avoidance_of_an_offer_out_of_capacity(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_one():
            pass

        @pytest.mark.gpu("T4:2")
        def test_two():
            pass
        """
    )
    before, since = _ids(sim), len(sim.requests())
    sim.fault(
        kind="http_error", op="create", status=429, code="rate_limited", retry_after=1, times=1
    )
    sim.fault(kind="http_error", op="create", status=500, code="internal", times=1)
    sim.fault(kind="http_error", op="create", status=503, code="out_of_capacity", times=1)
    # lazy: the two creates come one after the other, so the second sees the first's failover
    result = gpu_run("--gpu-region", "eu-*", "--gpu-start", "lazy")
    result.assert_outcomes(passed=2)
    # eu-central-1 (first in order) was out of capacity; eu-west-1 is next, for both
    assert sorted((i["gpu_type"], i["count"], i["region"]) for i in _new(sim, before)) == [
        ("T4", 1, "eu-west-1"),
        ("T4", 2, "eu-west-1"),
    ]
    # a rate limit and a server error are retried (the same offer), capacity moves on
    creates = _creates(sim, since)
    assert [r["status"] for r in creates] == [429, 500, 503, 201, 201]
    assert _time(creates[1]["time"]) - _time(creates[0]["time"]) >= 1.0, "Retry-After honoured"


def test_when_nothing_fits_the_tests_say_what_was_tried_and_others_run(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_t4():
            pass

        @pytest.mark.gpu("B200")
        def test_b200():
            pass

        @pytest.mark.gpu("L4")
        def test_l4():
            pass
        """
    )
    before, since = _ids(sim), len(sim.requests())
    sim.fault(
        kind="http_error",
        op="create",
        status=503,
        code="out_of_capacity",
        gpu_type="T4",
        times=None,
    )
    result = gpu_run("--gpu-region", "eu-*")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_t4*",
            "gpu-cloud: no instance for T4: out of capacity: T4 in eu-central-1, T4 in eu-west-1",
            "*ERROR at setup of test_b200*",
            "gpu-cloud: no offer for B200 in regions eu-[*]: B200 is offered in us-east-1",
        ]
    )
    assert [(i["gpu_type"], i["region"]) for i in _new(sim, before)] == [("L4", "eu-west-1")]
    bodies = [r for r in _creates(sim, since) if r["status"] == 503]
    assert len(bodies) == 2, "each T4 offer tried once, then avoided"


def test_create_calls_are_bounded(gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    before, since = _ids(sim), len(sim.requests())
    sim.fault(kind="http_error", op="create", status=503, code="out_of_capacity", times=None)
    result = gpu_run("--gpu-max-creates", "2")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*gpu-cloud: no instance for T4: --gpu-max-creates 2 create calls were used up "
            "(out of capacity: T4 in eu-central-1, T4 in eu-west-1)*"
        ]
    )
    assert len(_creates(sim, since)) == 2
    assert not _new(sim, before)


def test_budget_ends_the_tests_it_cannot_pay_for_as_errors_and_creates_nothing_more(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_first():
            pass

        @pytest.mark.gpu("B200")
        def test_dear():
            pass

        @pytest.mark.gpu("H100")
        def test_dear_too():
            pass

        @pytest.mark.gpu("T4")
        def test_last():
            pass

        def test_local():
            pass
        """
    )
    before = _ids(sim)
    # unknown durations: a new T4 is expected to cost 0.53 $/h x (90 s + 30 s) = $0.018,
    # a B200 $0.23, an H100 $0.11
    result = gpu_run("--gpu-budget", "0.05")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_dear *",
            "gpu-cloud: the budget of $0.0500 would be passed by *::test_dear on a new B200 "
            "(expected boot 90 s + test 30 s at $6.99/h): *; raise --gpu-budget to run it",
            "*ERROR at setup of test_dear_too*",
            "gpu-cloud: the budget of $0.0500 would be passed by *::test_dear_too on a new H100 *",
        ]
    )
    result.stdout.fnmatch_lines(["budget: $0.0500, $0.0* spent"])
    assert [i["gpu_type"] for i in _new(sim, before)] == ["T4"]


def test_a_short_test_shares_a_running_dearer_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makeconftest(
        """
        ORDER = ["test_a1", "test_shared", "test_a2"]

        def pytest_collection_modifyitems(items):
            items.sort(key=lambda item: ORDER.index(item.name))
        """
    )
    pytester.makepyfile(
        test_share="""
        import pytest

        @pytest.mark.gpu("24GB+")
        def test_shared():
            pass

        class TestBig:
            @pytest.fixture(scope="class")
            def weights(self):
                return "loaded"

            @pytest.mark.gpu("A100-80GB")
            def test_a1(self, weights):
                pass

            @pytest.mark.gpu("A100-80GB")
            def test_a2(self, weights):
                pass
        """
    )
    # earlier runs: the tests take a second; an L4 takes five minutes to boot
    durations = {f"test_share.py::{name}": 1.0 for name in ("test_shared",)}
    durations |= {f"test_share.py::TestBig::{name}": 1.0 for name in ("test_a1", "test_a2")}
    _seed_cache(pytester, durations, {"L4": 300.0, "A100-80GB": 300.0})
    before = _ids(sim)
    result = gpu_run("-v")
    # test_shared runs between two tests of TestBig on the same remote session: the class
    # is torn down before it and set up again after it
    result.assert_outcomes(passed=3)
    created = _new(sim, before)
    assert [i["gpu_type"] for i in created] == ["A100-80GB"]
    result.stdout.fnmatch_lines([f"*test_shared PASSED [[]A100-80GB {created[0]['id']}[]]*"])


def test_early_release_and_the_json_report(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_URL", sim.url)
    pytester.makepyfile(
        """
        import os
        import time

        import httpx
        import pytest

        @pytest.mark.gpu("T4")
        def test_t4():
            pass

        def test_local_waits_for_the_t4_to_go():
            headers = {"Authorization": "Bearer " + os.environ["GPUCLOUD_API_KEY"]}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                answer = httpx.get(os.environ["SIM_URL"] + "/_sim/instances", headers=headers)
                t4 = [i for i in answer.json() if i["gpu_type"] == "T4"]
                if t4 and t4[-1]["status"] == "terminated":
                    return
                time.sleep(0.05)
            raise AssertionError("the T4 instance outlived its last test")

        @pytest.mark.gpu("A100-80GB")
        def test_a100():
            pass
        """
    )
    before = _ids(sim)
    gpu_run("--gpu-report", "out/cost.json").assert_outcomes(passed=3)
    billed = {i["id"]: i for i in _new(sim, before)}
    by_type = {i["gpu_type"]: i for i in billed.values()}
    assert by_type["T4"]["terminated_at"] < by_type["A100-80GB"]["deleted_at"]

    # the JSON report matches what the cloud billed
    report = json.loads((pytester.path / "out" / "cost.json").read_text())
    assert sorted(i["id"] for i in report["instances"]) == sorted(billed)
    for entry in report["instances"]:
        record = billed[entry["id"]]
        assert abs(entry["created_at"] - _time(record["created_at"])) < 1
        assert abs(entry["deleted_at"] - _time(record["deleted_at"])) < 1
        sim_seconds = _time(record["deleted_at"]) - _time(record["created_at"])
        assert abs(entry["seconds"] - sim_seconds) < 1
        assert entry["billed_seconds"] == math.ceil(entry["seconds"]) or (
            entry["billed_seconds"] == math.ceil(entry["seconds"]) + 1  # rounded to 1 ms
        )
        per_second = entry["price_per_hour"] * entry["billed_seconds"] / 3600
        assert entry["cost"] == pytest.approx(per_second, abs=1e-6)
    ran_on = {
        t["nodeid"].split("::")[1]: billed[t["instance"]]["gpu_type"] for t in report["tests"]
    }
    assert ran_on == {"test_t4": "T4", "test_a100": "A100-80GB"}
    total = sum(i["cost"] for i in report["instances"])
    assert report["total_cost"] == pytest.approx(total, abs=1e-5)


def test_plan_mode_prints_the_plan_and_creates_and_runs_nothing(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pathlib
        import pytest

        def test_local():
            pathlib.Path("local-ran").touch()

        @pytest.mark.gpu("T4")
        def test_t4():
            pass

        @pytest.mark.gpu("A100-80GB")
        def test_a100():
            pass
        """
    )
    before, since = _ids(sim), len(sim.requests())
    # with -n too: plan mode starts no xdist worker
    result = gpu_run("--gpu-plan", "--gpu-report", "plan.json", "-n", "2")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "plan: 2 instance(s), * s expected, $* (at most 8 alive at once)",
            "  T4 in eu-central-1 at $0.53/h: 1 test(s), boot * s + tests * s = * s, $*",
            "    test_plan_mode*.py::test_t4",
            "  A100-80GB in eu-central-1 at $2.49/h: 1 test(s)*",
            "    test_plan_mode*.py::test_a100",
            "local tests: 1",
            "--gpu-plan: no instance was created and no test ran",
        ]
    )
    assert not _new(sim, before)
    assert [r["path"] for r in sim.requests()[since:]] == ["/v1/gpu-types"]
    assert not (pytester.path / "local-ran").exists()
    report = json.loads((pytester.path / "plan.json").read_text())
    assert report["instances"] == []
    assert [m["gpu_type"] for m in report["plan"]["instances"]] == ["T4", "A100-80GB"]


def test_max_instances_holds_by_releasing_an_idle_instance_first(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_t4():
            pass

        @pytest.mark.gpu("L4")
        def test_l4():
            pass

        @pytest.mark.gpu("T4")
        def test_t4_again():
            pass
        """
    )
    before = _ids(sim)
    gpu_run("--gpu-max-instances", "1").assert_outcomes(passed=3)
    # the T4 is still needed when the L4 test comes: it is released to make room, and
    # a new one made for the last test
    created = sorted(_new(sim, before), key=lambda i: _time(i["created_at"]))
    assert [i["gpu_type"] for i in created] == ["T4", "L4", "T4"]
    for earlier, later in itertools.pairwise(created):
        assert _time(earlier["deleted_at"]) <= _time(later["created_at"]), "two alive at once"


ORDERED_BESIDE_A100 = """
import pytest

@pytest.mark.gpu("A100-80GB")
def test_a100():
    pass

@pytest.mark.gpu(["H100", "A100"])
def test_ordered():
    pass
"""


def test_an_ordered_list_takes_its_first_choice_while_it_can_be_had(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    # Sharing the running A100 would be cheaper (a test of a second, boots of five
    # minutes), but "an H100, else an A100" means the H100 while one can be had.
    pytester.makepyfile(test_order=ORDERED_BESIDE_A100)
    tests = {f"test_order.py::{name}": 1.0 for name in ("test_a100", "test_ordered")}
    _seed_cache(pytester, tests, {"H100": 300.0, "A100-80GB": 300.0})
    planned = gpu_run("--gpu-plan", "-v", "-p", "no:randomly")
    planned.stdout.fnmatch_lines(
        [
            "plan: 2 instance(s)*",
            "  A100-80GB in * 1 test(s)*",
            "    test_order.py::test_a100",
            "  H100 in * 1 test(s)*",
            "    test_order.py::test_ordered",
        ]
    )
    before = _ids(sim)
    result = gpu_run("-v", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    by_type = {i["gpu_type"]: i["id"] for i in _new(sim, before)}
    assert sorted(by_type) == ["A100-80GB", "H100"]
    result.stdout.fnmatch_lines([f"*test_ordered PASSED [[]H100 {by_type['H100']}[]]*"])


def test_an_ordered_list_shares_its_second_choice_when_the_first_cannot_be_had(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_order=ORDERED_BESIDE_A100)
    tests = {f"test_order.py::{name}": 1.0 for name in ("test_a100", "test_ordered")}
    _seed_cache(pytester, tests, {"H100": 300.0, "A100-80GB": 300.0})
    sim.fault(
        kind="http_error",
        op="create",
        status=503,
        code="out_of_capacity",
        gpu_type="H100",
        times=None,
    )
    before = _ids(sim)
    result = gpu_run("-v", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert "H100" not in {i["gpu_type"] for i in _new(sim, before)}
    result.stdout.fnmatch_lines(["*test_ordered PASSED [[]A100-*"])
