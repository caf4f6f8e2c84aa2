"""The fleet's decisions as pure functions over plain data: no I/O, no event loop, no clock.

:class:`~pytest_gpucloud.scheduling.fleet.Fleet` gathers the facts (its machines, the queued
tests, the meter), asks these functions, and applies the answers:

- :func:`rank_idle` and :func:`pick_starting`: which machine a test goes to;
- :func:`may_share`: whether a test may run on a machine made for another pool;
- :func:`victim`: which idle machine is released to make room at the instance limit;
- :func:`over_budget`: the budget check;
- :func:`warm_starts`: when each planned machine starts (``--gpu-start``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from pytest_gpucloud.core.catalog import Offer
    from pytest_gpucloud.core.request import GpuRequest
    from pytest_gpucloud.scheduling.cost import CostModel

_M = TypeVar("_M")
# --gpu-start jit starts an instance this share of its expected boot early.
JIT_MARGIN = 0.05


@dataclass(frozen=True)
class Seat(Generic[_M]):
    """A machine as placement sees it; ``machine`` is the caller's handle on it."""

    machine: _M
    pool: GpuRequest
    price_per_hour: float
    claimed_by: str | None = None  # the owner waiting for it or running a test on it
    last_owner: str | None = None
    promise: str | None = None  # the nextid its last test was run with
    requested_at: float = 0.0


def rank_idle(seats: Sequence[Seat[_M]], nodeid: str, pool: GpuRequest, owner: str) -> list[_M]:
    """Idle machines that can host ``nodeid``, best first: the one its owner claimed, the one
    its owner's last test named it as next on (fixtures stay up), not one promised to another
    owner, one its owner used last, one of its own pool, the cheapest."""

    def preference(seat: Seat[_M]) -> tuple[bool, bool, bool, bool, bool, float]:
        reserved = seat.promise not in (None, nodeid) and seat.last_owner != owner
        return (
            seat.claimed_by != owner,
            seat.promise != nodeid,
            reserved,
            seat.last_owner != owner,
            seat.pool != pool,
            seat.price_per_hour,
        )

    return [seat.machine for seat in sorted(seats, key=preference)]


def pick_starting(seats: Sequence[Seat[_M]], pool: GpuRequest) -> _M | None:
    """Of the unclaimed machines still starting that can host a test of ``pool``: one of its
    own pool before another's, the one asked for first."""
    chosen = min(seats, key=lambda s: (s.pool != pool, s.requested_at), default=None)
    return None if chosen is None else chosen.machine


def hosts(
    host: GpuRequest,
    offer: Offer,
    request: GpuRequest,
    feasible: Sequence[Offer],
    best: Offer | None = None,
) -> bool:
    """Whether an instance of ``offer`` made for ``host`` satisfies ``request`` too.

    ``feasible``: ``request``'s offers (for an ordered list, of all its types); ``best``: the
    best of them that can be had now. An ordered list keeps its order: no later choice is
    shared while an earlier one can be had.
    """
    return (
        host.count == request.count
        and host.image == request.image
        and any(o.key == offer.key for o in feasible)
        and (best is None or _choice(request, offer) <= _choice(request, best))
    )


def _choice(request: GpuRequest, offer: Offer) -> int:
    """Which entry of an ordered list ``offer`` answers (0 for every other form)."""
    if request.mode != "ordered":
        return 0
    return next(i for i, name in enumerate(request.types) if offer.gpu.matches(name))


def may_share(
    host: GpuRequest,
    offer: Offer,
    price_per_hour: float,
    request: GpuRequest,
    nodeid: str,
    *,
    feasible: Sequence[Offer],
    new_offers: Sequence[Offer],
    costs: CostModel,
) -> bool:
    """Whether ``nodeid`` (of ``request``) may run on a machine of ``offer`` made for
    ``host``: its own pool's, or one that satisfies it where running there is not dearer
    than a new machine of its own (``new_offers``: those it may still be created from, best
    first; none left: sharing is its only way)."""
    pool = request.pool_key
    if host == pool:
        return True
    if not hosts(host, offer, pool, feasible, new_offers[0] if new_offers else None):
        return False
    return not new_offers or costs.share_ok(price_per_hour, new_offers[0], pool.count, nodeid)


def victim(idle: Sequence[_M], users: Callable[[_M], int]) -> _M | None:
    """The idle machine to release to make room at the instance limit: the one the fewest
    queued tests could use (the first of equals)."""
    return min(idle, key=users, default=None)


def over_budget(budget: float | None, spent: float, under_way: float, extra: float) -> bool:
    """Whether ``extra`` on top of what is spent and the work under way passes ``budget``."""
    return budget is not None and spent + under_way + extra > budget


def left_to_pay(price_per_hour: float, seconds_left: float) -> float:
    """The expected cost still to come of a machine busy or starting for ``seconds_left``."""
    return price_per_hour * max(0.0, seconds_left) / 3600


class Planned(Protocol):
    """A machine of the plan, as warm starts see it."""

    @property
    def pool(self) -> GpuRequest: ...
    @property
    def boot_s(self) -> float: ...
    @property
    def lead_s(self) -> float: ...


@dataclass(frozen=True)
class WarmStart:
    """Start the ``nth`` machine of ``pool`` after ``delay_s``."""

    pool: GpuRequest
    delay_s: float
    nth: int


def warm_starts(
    planned: Sequence[Planned], mode: Literal["eager", "jit", "lazy"]
) -> list[WarmStart]:
    """eager: every planned machine now; jit: each pool's first one about when its first
    test is due (its lead time less its expected boot, and a margin); lazy: none."""
    if mode == "lazy":
        return []
    starts: list[WarmStart] = []
    nth: dict[GpuRequest, int] = {}
    for machine in sorted(planned, key=lambda m: m.lead_s):
        nth[machine.pool] = nth.get(machine.pool, 0) + 1
        if mode == "eager":
            starts.append(WarmStart(machine.pool, 0.0, nth[machine.pool]))
        elif nth[machine.pool] == 1:
            delay = max(0.0, machine.lead_s - machine.boot_s * (1 + JIT_MARGIN))
            starts.append(WarmStart(machine.pool, delay, 1))
    return starts
