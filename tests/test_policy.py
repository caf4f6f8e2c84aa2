"""The fleet's decisions (scheduling/policy.py) on plain data: no network, no event loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from pytest_gpucloud.core.catalog import GpuType, Offer, feasible_offers
from pytest_gpucloud.core.request import GpuRequest, parse_marker
from pytest_gpucloud.scheduling import policy
from pytest_gpucloud.scheduling.cost import CostModel
from pytest_gpucloud.scheduling.durations import Durations
from pytest_gpucloud.scheduling.policy import Seat, WarmStart

US = "us-east-1"
T4 = GpuType("T4", 16, 0.53, True, (US,))
L4 = GpuType("L4", 24, 0.70, True, (US,))
B200 = GpuType("B200", 180, 6.99, True, (US,))
CATALOG = [T4, L4, B200]
COSTS = CostModel(Durations())  # every test 30 s, every boot 90 s


def gpu(*args: object, **kwargs: object) -> GpuRequest:
    return parse_marker(args, kwargs)


def offer(gpu_type: GpuType) -> Offer:
    return Offer(gpu_type, US)


# -- which machine a test goes to ------------------------------------------------------------

MINE, OTHER = gpu("T4"), gpu("L4")


@pytest.mark.parametrize(
    ("seats", "best"),
    [
        pytest.param(
            [Seat("free", MINE, 0.5), Seat("claimed", MINE, 0.5, claimed_by="w1")],
            "claimed",
            id="the machine its owner claimed",
        ),
        pytest.param(
            [Seat("free", MINE, 0.5), Seat("promised", MINE, 0.5, promise="t1")],
            "promised",
            id="the machine its last test named it on (fixtures stay up)",
        ),
        pytest.param(
            [Seat("reserved", MINE, 0.5, promise="t9", last_owner="w2"), Seat("free", MINE, 0.9)],
            "free",
            id="not one promised to another owner's next test",
        ),
        pytest.param(
            [Seat("free", MINE, 0.5), Seat("used", MINE, 0.9, last_owner="w1")],
            "used",
            id="the one its owner used last",
        ),
        pytest.param(
            [Seat("shared", OTHER, 0.1), Seat("own", MINE, 0.9)],
            "own",
            id="its own pool's before another's",
        ),
        pytest.param(
            [Seat("dear", MINE, 0.9), Seat("cheap", MINE, 0.5)],
            "cheap",
            id="the cheapest of equals",
        ),
    ],
)
def test_rank_idle(seats: list[Seat[str]], best: str) -> None:
    assert policy.rank_idle(seats, "t1", MINE, "w1")[0] == best


@pytest.mark.parametrize(
    ("seats", "chosen"),
    [
        ([], None),
        (
            [Seat("other", OTHER, 0.7, requested_at=1.0), Seat("own", MINE, 0.5, requested_at=2.0)],
            "own",
        ),
        (
            [Seat("late", MINE, 0.5, requested_at=2.0), Seat("early", MINE, 0.5, requested_at=1.0)],
            "early",
        ),
    ],
)
def test_pick_starting(seats: list[Seat[str]], chosen: str | None) -> None:
    assert policy.pick_starting(seats, MINE) == chosen


# -- whether a test may share another pool's machine -----------------------------------------


@pytest.mark.parametrize(
    ("host", "host_type", "guest", "avoided", "shares"),
    [
        pytest.param(gpu("T4"), T4, gpu("T4", timeout=60), (), True, id="same pool"),
        pytest.param(gpu("T4"), T4, gpu("16GB+", count=2), (), False, id="another count"),
        pytest.param(gpu("T4"), T4, gpu("16GB+", image="img:1"), (), False, id="another image"),
        pytest.param(gpu("T4"), T4, gpu("L4"), (), False, id="a type it did not ask for"),
        pytest.param(gpu("L4"), L4, gpu("16GB+"), (), True, id="not dearer than a new T4"),
        pytest.param(gpu("B200"), B200, gpu("16GB+"), (), False, id="dearer than a new T4"),
        pytest.param(
            gpu("B200"), B200, gpu("16GB+"), (T4, L4, B200), True, id="no new machine possible"
        ),
        pytest.param(
            gpu("L4"), L4, gpu(["T4", "L4"]), (), False, id="ordered list: not its second first"
        ),
        pytest.param(
            gpu("L4"), L4, gpu(["T4", "L4"]), (T4,), True, id="ordered list: its second, no T4"
        ),
        pytest.param(gpu("B200"), B200, gpu(["T4", "L4"]), (), False, id="ordered list: not in it"),
    ],
)
def test_may_share(
    host: GpuRequest,
    host_type: GpuType,
    guest: GpuRequest,
    avoided: tuple[GpuType, ...],
    shares: bool,
) -> None:
    pool = guest.pool_key
    feasible = feasible_offers(pool, CATALOG)
    new = [o for o in feasible if o.gpu not in avoided]
    host_offer = offer(host_type)
    allowed = policy.may_share(
        host.pool_key,
        host_offer,
        host_offer.price(host.count),
        guest,
        "t1",
        feasible=feasible,
        new_offers=new,
        costs=COSTS,
    )
    assert allowed is shares


# -- which idle machine is released at the limit ---------------------------------------------


@pytest.mark.parametrize(
    ("users", "released"),
    [({}, None), ({"a": 3, "b": 0, "c": 1}, "b"), ({"a": 1, "b": 1}, "a")],
)
def test_victim(users: dict[str, int], released: str | None) -> None:
    assert policy.victim(list(users), users.__getitem__) == released


# -- the budget ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "spent", "under_way", "extra", "over"),
    [
        (None, 100.0, 100.0, 100.0, False),
        (1.0, 0.2, 0.3, 0.5, False),  # exactly at the budget
        (1.0, 0.2, 0.3, 0.51, True),
        (1.0, 0.0, 1.2, 0.0, True),  # work under way counts
    ],
)
def test_over_budget(
    budget: float | None, spent: float, under_way: float, extra: float, over: bool
) -> None:
    assert policy.over_budget(budget, spent, under_way, extra) is over


@pytest.mark.parametrize(("seconds", "cost"), [(3600.0, 2.0), (1800.0, 1.0), (-5.0, 0.0)])
def test_left_to_pay(seconds: float, cost: float) -> None:
    assert policy.left_to_pay(2.0, seconds) == cost


# -- when a planned machine starts -----------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    pool: GpuRequest
    boot_s: float
    lead_s: float


PLAN = [Planned(OTHER, 100.0, 50.0), Planned(MINE, 100.0, 400.0), Planned(MINE, 100.0, 300.0)]


@pytest.mark.parametrize(
    ("mode", "starts"),
    [
        ("lazy", []),
        ("eager", [WarmStart(OTHER, 0.0, 1), WarmStart(MINE, 0.0, 1), WarmStart(MINE, 0.0, 2)]),
        # jit: each pool's first machine, its expected boot (and 5%) before its first test
        ("jit", [WarmStart(OTHER, 0.0, 1), WarmStart(MINE, 195.0, 1)]),
    ],
)
def test_warm_starts(mode: Literal["eager", "jit", "lazy"], starts: list[WarmStart]) -> None:
    assert policy.warm_starts(PLAN, mode) == starts
