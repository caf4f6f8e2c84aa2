"""The cost model, the plan, failover bookkeeping, expected durations and the cost report,
on a fixed catalog."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_gpucloud.core.catalog import GpuType, Offer, explain_infeasible, feasible_offers
from pytest_gpucloud.core.errors import ProviderError
from pytest_gpucloud.core.request import GpuRequest, parse_marker
from pytest_gpucloud.machine.failover import Failover
from pytest_gpucloud.scheduling.cost import Bill, CostModel, billed, billed_hourly
from pytest_gpucloud.scheduling.durations import DEFAULT_BOOT_S, DEFAULT_TEST_S, Durations
from pytest_gpucloud.scheduling.planner import Plan, make_plan
from pytest_gpucloud.scheduling.policy import hosts

if TYPE_CHECKING:
    # not at run time: pytest 8.0 would collect the alias as a test class
    from pytest_gpucloud.core.request import Tests
from pytest_gpucloud.session.summary import summary_lines

US, EU_W, EU_C = "us-east-1", "eu-west-1", "eu-central-1"
CATALOG = [
    GpuType("T4", 16, 0.53, True, (US, EU_W)),
    GpuType("L4", 24, 0.70, True, (US, EU_C)),
    GpuType("A100-80GB", 80, 2.49, True, (US, EU_C)),
    GpuType("B200", 180, 6.99, True, (US,)),
]


def gpu(*args: object, **kwargs: object) -> GpuRequest:
    return parse_marker(args, kwargs)


def plan(
    tests: Tests,
    durations: Durations | None = None,
    *,
    regions: Sequence[str] = (),
    workers: int = 1,
    max_instances: int = 8,
) -> Plan:
    return make_plan(
        tests,
        offers=lambda r: feasible_offers(r, CATALOG, regions),
        explain=lambda r: explain_infeasible(r, CATALOG, regions),
        costs=CostModel(durations or Durations()),
        workers=workers,
        max_instances=max_instances,
    )


def where(result: Plan) -> dict[str, tuple[str, str]]:
    """nodeid -> (type, region) of the planned instance it goes to."""
    return {n: m.offer.key for m in result.machines for n in m.tests}


# -- the cost model --------------------------------------------------------------------------


def test_billing_per_started_second_and_per_started_hour() -> None:
    assert billed(3.6, 10.2) == pytest.approx(3.6 * 11 / 3600)
    assert billed(1.0, 0) == 0
    assert billed_hourly(2.0, 1) == 2.0
    assert billed_hourly(2.0, 3601) == 4.0


def test_new_instance_costs_boot_and_test_a_running_one_only_the_test() -> None:
    durations = Durations({"t": 60.0}, {"T4": 120.0})
    model = CostModel(durations)
    t4 = Offer(CATALOG[0], US)
    assert model.new(t4, 2, "t") == pytest.approx(0.53 * 2 * 180 / 3600)
    assert model.on_running(2.49, "t") == pytest.approx(2.49 * 60 / 3600)
    unknown = model.new(t4, 1, "unknown")
    assert unknown == pytest.approx(0.53 * (120 + DEFAULT_TEST_S) / 3600)
    assert CostModel(Durations()).new(t4, 1, "t") == pytest.approx(
        0.53 * (DEFAULT_BOOT_S + DEFAULT_TEST_S) / 3600
    )


@pytest.mark.parametrize(
    ("test_s", "boot_s", "shares"),
    [
        (10.0, 120.0, True),  # short test, slow boot: the running A100 is cheaper
        (600.0, 120.0, False),  # long test: its own L4 is cheaper
        (30.0, 5.0, False),  # fast boot
    ],
)
def test_sharing_a_running_instance_only_when_not_dearer(
    test_s: float, boot_s: float, shares: bool
) -> None:
    model = CostModel(Durations({"t": test_s}, {"L4": boot_s}))
    l4 = Offer(CATALOG[1], US)
    assert model.share_ok(2.49, l4, 1, "t") is shares
    assert model.share_ok(0.70, l4, 1, "t"), "the same price is never dearer"


def test_summary_shows_each_instance_the_total_hourly_and_budget() -> None:
    assert summary_lines([]) == ["no instance was created"]
    bill = Bill("i-1", "A100-80GB", 2, EU_C, 4.98, 1000.0, 1010.0, 1090.4, 3)
    lines = summary_lines([bill], budget=1.0)
    assert lines == [
        "i-1          A100-80GB:2  eu-central-1       3 tests     90.4 s  $0.1259",
        "total: 1 instance(s), 90.4 s, $0.1259 billed per second "
        "($4.98 if billed by the started hour)",
        "budget: $1.0000, $0.1259 spent",
    ]


# -- the plan --------------------------------------------------------------------------------


def test_each_pool_gets_its_cheapest_offer_and_local_tests_are_counted() -> None:
    result = plan([("a", gpu("T4")), ("l", None), ("b", gpu("A100")), ("c", gpu("T4"))])
    # cheapest first, then by name, then by region
    assert where(result) == {"a": ("T4", EU_W), "c": ("T4", EU_W), "b": ("A100-80GB", EU_C)}
    assert result.local_tests == 1
    assert not result.unplaceable


def test_region_allow_list_holds_and_says_why_nothing_fits() -> None:
    tests: Tests = [("a", gpu("T4")), ("b", gpu("B200")), ("c", gpu("any"))]
    result = plan(tests, regions=("eu-*",))
    assert where(result) == {"a": ("T4", EU_W), "c": ("T4", EU_W)}
    assert all(m.offer.region.startswith("eu-") for m in result.machines)
    assert result.unplaceable == {
        "b": "no offer for B200 in regions eu-*: B200 is offered in us-east-1"
    }


def test_a_short_pool_shares_a_dearer_running_instance_when_cheaper() -> None:
    durations = Durations({"big": 60.0, "small": 10.0}, {"L4": 120.0, "A100-80GB": 120.0})
    tests: Tests = [("small", gpu("24GB+")), ("big", gpu("A100"))]
    result = plan(tests, durations)
    assert len(result.machines) == 1
    assert where(result) == {"small": ("A100-80GB", EU_C), "big": ("A100-80GB", EU_C)}
    # the shared test is due first: the host's lead is the earliest of its tests
    assert result.machines[0].lead_s == 0


def test_a_long_pool_keeps_its_own_instance() -> None:
    durations = Durations({"big": 60.0, "small": 900.0}, {"L4": 120.0})
    result = plan([("small", gpu("24GB+")), ("big", gpu("A100"))], durations)
    assert where(result) == {"small": ("L4", EU_C), "big": ("A100-80GB", EU_C)}


def test_requests_that_differ_in_count_or_image_never_share() -> None:
    durations = Durations({"a": 1.0, "b": 1.0}, {"T4": 600.0})
    result = plan([("a", gpu("T4:2")), ("b", gpu("T4"))], durations)
    assert len(result.machines) == 2
    t4 = Offer(CATALOG[0], US)
    assert not hosts(gpu("T4:2"), t4, gpu("T4"), [t4])
    assert not hosts(gpu("T4", image="x:1"), t4, gpu("T4"), [t4])
    assert hosts(gpu("T4"), t4, gpu("any"), [t4])


def test_an_ordered_list_shares_no_later_choice_while_an_earlier_one_can_be_had() -> None:
    # sharing the A100 would be cheaper than booting a B200 (a test of a second, a boot of
    # ten minutes): the ordered list's first choice still wins
    durations = Durations({"a": 1.0, "o": 1.0}, {"B200": 600.0, "A100-80GB": 600.0})
    tests: Tests = [("a", gpu("A100")), ("o", gpu(["B200", "A100"]))]
    assert where(plan(tests, durations)) == {"a": ("A100-80GB", EU_C), "o": ("B200", US)}
    # no B200 in the allowed regions: the second choice is the best to be had, and is shared
    in_eu = plan(tests, durations, regions=["eu-*"])
    assert where(in_eu) == {"a": ("A100-80GB", EU_C), "o": ("A100-80GB", EU_C)}
    a100, b200 = Offer(CATALOG[2], US), Offer(CATALOG[3], US)
    ordered = gpu(["B200", "A100"])
    assert not hosts(gpu("A100"), a100, ordered, [b200, a100], b200)
    assert hosts(gpu("A100"), a100, ordered, [b200, a100], a100)
    assert hosts(gpu("B200"), b200, ordered, [b200, a100], a100)  # an earlier choice: always


def test_a_guest_pool_spreads_over_its_hosts_machines_with_the_host_pool() -> None:
    durations = Durations({"g": 1.0, "h": 1.0}, {"L4": 300.0})
    result = plan([("g", gpu("24GB+")), ("h", gpu("A100"))], durations, workers=2)
    assert [(m.offer.gpu.name, m.tests) for m in result.machines] == [
        ("A100-80GB", ["g"]),
        ("A100-80GB", ["h"]),
    ]


def test_leads_come_from_known_durations_and_split_over_workers() -> None:
    durations = Durations({"l1": 4.0, "l2": 6.0, "g1": 2.0})
    tests: Tests = [("l1", None), ("l2", None), ("g1", gpu("T4")), ("l3", None), ("g2", gpu("L4"))]
    result = plan(tests, durations)
    assert [m.lead_s for m in result.machines] == [10.0, 12.0]  # l3 unknown: 0 s
    assert [m.lead_s for m in plan(tests, durations, workers=2).machines] == [5.0, 6.0]


def test_workers_get_a_machine_each_up_to_the_instance_limit() -> None:
    tests: Tests = [(f"t{i}", gpu("T4")) for i in range(8)]
    assert len(plan(tests, workers=4).machines) == 4
    assert len(plan(tests, workers=4, max_instances=2).machines) == 2
    assert len(plan(tests[:1], workers=4).machines) == 1
    split = plan(tests, workers=4).machines
    assert sorted(n for m in split for n in m.tests) == sorted(n for n, _ in tests)


def test_plan_lines_and_json_show_instances_tests_seconds_and_cost() -> None:
    durations = Durations({"a": 30.0, "b": 30.0}, {"T4": 60.0})
    tests: Tests = [("a", gpu("T4")), ("b", gpu("T4")), ("x", gpu("B200"))]
    result = plan(tests, durations, regions=("eu-*",))
    lines = result.lines(verbose=True)
    cost = billed(0.53, 120)
    assert lines[0] == f"plan: 1 instance(s), 120 s expected, ${cost:.4f} (at most 8 alive at once)"
    assert lines[1] == (
        f"  T4 in eu-west-1 at $0.53/h: 2 test(s), boot 60 s + tests 60 s = 120 s, ${cost:.4f}"
    )
    assert lines[2:4] == ["    a", "    b"]
    assert result.lines(budget=1.0) == result.lines()
    assert result.lines(budget=0.01)[-1] == (
        f"the expected ${cost:.4f} is more than --gpu-budget $0.0100: the tests that would "
        "pass it will end as errors"
    )
    data = json.loads(json.dumps(result.to_json()))
    assert data["instances"][0]["tests"] == ["a", "b"]
    assert data["instances"][0]["cost"] == pytest.approx(cost, abs=1e-6)
    assert list(data["unplaceable"]) == ["x"]


# -- failover --------------------------------------------------------------------------------


def test_failover_avoids_offers_out_of_capacity_and_bounds_creates() -> None:
    offers = feasible_offers(gpu("T4"), CATALOG)
    failover = Failover(max_creates=2)
    assert [o.region for o in offers] == [EU_W, US]
    failover.avoid(offers[1])
    assert failover.usable(offers) == offers[:1]
    failover.spend_create("T4", [])
    failover.spend_create("T4", [])
    with pytest.raises(ProviderError, match=r"--gpu-max-creates 2 create calls were used up"):
        failover.spend_create("T4", ["T4 in us-east-1"])
    error = failover.exhausted("T4", offers, ["T4 in eu-west-1"])
    assert str(error) == (
        "gpu-cloud: no instance for T4: out of capacity: T4 in eu-west-1; "
        "out of capacity earlier in this session: T4 in us-east-1"
    )


# -- expected durations ----------------------------------------------------------------------


def test_durations_round_trip_through_the_cache(pytester: pytest.Pytester) -> None:
    cache = pytester.parseconfigure().cache
    assert cache is not None
    durations = Durations.load(cache)
    assert durations.known("t") is None
    assert durations.test_s("t") == DEFAULT_TEST_S
    assert durations.boot_s("T4") == DEFAULT_BOOT_S
    durations.add_phase("t", 0.5)
    durations.add_phase("t", 1.0)
    durations.record_boot("T4", 3.25)
    durations.save(cache)
    again = Durations.load(cache)
    assert again.known("t") == 1.5
    assert again.boot_s("T4") == 3.25


def test_a_damaged_cache_entry_is_ignored(pytester: pytest.Pytester) -> None:
    cache = pytester.parseconfigure().cache
    assert cache is not None
    cache.set("gpucloud/durations", {"a": "slow", "b": -1, "c": True, "d": 2})
    cache.set("gpucloud/boot", ["not", "a", "table"])
    durations = Durations.load(cache)
    assert durations.tests == {"d": 2.0}
    assert durations.boots == {}
    assert math.isclose(Durations.load(None).test_s("x"), DEFAULT_TEST_S)


def test_report_file_is_json(tmp_path: Path) -> None:
    from pytest_gpucloud.session.summary import report, write_report

    data = report([], {}, budget=1.5, plan=None)
    write_report(tmp_path / "sub" / "report.json", data)
    loaded = json.loads((tmp_path / "sub" / "report.json").read_text())
    assert loaded == {
        "currency": "USD",
        "instances": [],
        "tests": [],
        "total_cost": 0,
        "hourly_cost": 0,
        "budget": 1.5,
        "plan": None,
    }
