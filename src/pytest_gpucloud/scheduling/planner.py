"""The plan: which instances a session needs, which tests go where, and when each is needed.

Made once, when collection finishes, from the session's items in run order. Each pool of
tests (equal :attr:`~pytest_gpucloud.core.request.GpuRequest.pool_key`) gets the cheapest
feasible offer, on ``min(workers, tests, max_instances)`` machines (``workers``: xdist
workers, 1 without), unless every one of its tests is cheaper on the instance of another
pool (:meth:`~pytest_gpucloud.scheduling.cost.CostModel.share_ok`, see :func:`_sharing`).
``lead_s`` is when a machine's first test is expected to start: the known durations of the
items before it (unknown ones count 0 s, so a start is never late for want of data), divided
by the workers. A ``gpu_service`` server gets an instance of its own, up from the start of
the session to its end (the known durations of all its items, divided by the workers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_gpucloud.core.units import format_dollars
from pytest_gpucloud.scheduling.cost import CostModel, billed
from pytest_gpucloud.scheduling.policy import hosts

if TYPE_CHECKING:
    from pytest_gpucloud.core.catalog import Offer
    from pytest_gpucloud.core.request import GpuRequest, Tests

# The gpu_service servers of a session: how the plan names each, and its request.
Services = Sequence[tuple[str, "GpuRequest"]]
SHOWN_TESTS = 10


@dataclass
class PlannedMachine:
    """One instance the plan needs."""

    pool: GpuRequest
    offer: Offer
    boot_s: float
    lead_s: float
    tests: list[str] = field(default_factory=list)
    work_s: float = 0.0
    service: str | None = None  # the gpu_service server it is for (it runs no test)

    @property
    def price_per_hour(self) -> float:
        return self.offer.price(self.pool.count)

    @property
    def seconds(self) -> float:
        return self.boot_s + self.work_s

    @property
    def cost(self) -> float:
        return billed(self.price_per_hour, self.seconds)

    @property
    def name(self) -> str:
        count = f":{self.pool.count}" if self.pool.count > 1 else ""
        return f"{self.offer.gpu.name}{count} in {self.offer.region}"

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu_type": self.offer.gpu.name,
            "count": self.pool.count,
            "region": self.offer.region,
            "price_per_hour": self.price_per_hour,
            "request": self.pool.canonical(),
            "tests": self.tests,
            "boot_s": round(self.boot_s, 3),
            "work_s": round(self.work_s, 3),
            "seconds": round(self.seconds, 3),
            "cost": round(self.cost, 6),
            "first_test_after_s": round(self.lead_s, 3),
            **({"service": self.service} if self.service else {}),
        }


@dataclass
class Plan:
    machines: list[PlannedMachine]
    # nodeid -> why no offer fits it (the test ends as an error naming this)
    unplaceable: dict[str, str]
    local_tests: int
    max_instances: int

    @property
    def cost(self) -> float:
        return sum(m.cost for m in self.machines)

    @property
    def seconds(self) -> float:
        return sum(m.seconds for m in self.machines)

    def lines(self, *, verbose: bool = False, budget: float | None = None) -> list[str]:
        """The plan for the terminal; ``verbose`` lists every test."""
        lines = [
            f"plan: {len(self.machines)} instance(s), {self.seconds:.0f} s expected, "
            f"${self.cost:.4f} (at most {self.max_instances} alive at once)"
        ]
        for machine in self.machines:
            what = machine.service or f"{len(machine.tests)} test(s)"
            during = "the session" if machine.service else "tests"
            lines.append(
                f"  {machine.name} at ${machine.price_per_hour:.2f}/h: {what}, boot "
                f"{machine.boot_s:.0f} s + {during} {machine.work_s:.0f} s = "
                f"{machine.seconds:.0f} s, ${machine.cost:.4f}"
            )
            shown = machine.tests if verbose else machine.tests[:SHOWN_TESTS]
            lines += [f"    {nodeid}" for nodeid in shown]
            if len(shown) < len(machine.tests):
                lines.append(f"    ... {len(machine.tests) - len(shown)} more (-v lists all)")
        lines += [f"  no instance: {nodeid}: {why}" for nodeid, why in self.unplaceable.items()]
        lines.append(f"local tests: {self.local_tests}")
        if budget is not None and self.cost > budget:
            lines.append(
                f"the expected {format_dollars(self.cost)} is more than --gpu-budget "
                f"{format_dollars(budget)}: the "
                "tests that would pass it will end as errors"
            )
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "instances": [m.to_json() for m in self.machines],
            "unplaceable": self.unplaceable,
            "local_tests": self.local_tests,
            "seconds": round(self.seconds, 3),
            "cost": round(self.cost, 6),
        }


def make_plan(
    tests: Tests,
    *,
    services: Services = (),
    offers: Callable[[GpuRequest], list[Offer]],
    explain: Callable[[GpuRequest], str],
    costs: CostModel,
    workers: int,
    max_instances: int,
) -> Plan:
    """The plan for ``tests``; ``offers(pool)``: its feasible offers, best first;
    ``explain(pool)``: why it has none."""
    pools: dict[GpuRequest, list[str]] = {}
    leads: dict[str, float] = {}
    elapsed = 0.0
    for nodeid, request in tests:
        if request is not None:
            pools.setdefault(request.pool_key, []).append(nodeid)
            leads[nodeid] = elapsed / workers
        elapsed += costs.durations.known(nodeid) or 0.0
    plan = Plan([], {}, sum(1 for _, r in tests if r is None), max_instances)
    own: dict[GpuRequest, Offer] = {}
    for pool, nodeids in pools.items():
        choices = offers(pool)
        if choices:
            own[pool] = choices[0]
        else:
            plan.unplaceable.update(dict.fromkeys(nodeids, explain(pool)))
    hosted = _sharing(own, pools, offers, costs)
    machines: dict[GpuRequest, list[PlannedMachine]] = {}
    for pool, offer in own.items():
        if pool not in hosted:
            guests = [n for p, host in hosted.items() if host == pool for n in pools[p]]
            count = max(1, min(workers, len(pools[pool]) + len(guests), max_instances))
            boot = costs.durations.boot_s(offer.gpu.name)
            lead = leads[pools[pool][0]]
            machines[pool] = [PlannedMachine(pool, offer, boot, lead) for _ in range(count)]
            plan.machines += machines[pool]
    placed: dict[GpuRequest, int] = {}  # host pool -> tests placed on its machines so far
    for pool in own:
        host = hosted.get(pool, pool)
        targets = machines[host]
        for nodeid in pools[pool]:
            target = targets[placed.get(host, 0) % len(targets)]
            placed[host] = placed.get(host, 0) + 1
            target.tests.append(nodeid)
            target.work_s += costs.durations.test_s(nodeid)
            target.lead_s = min(target.lead_s, leads[nodeid])
    for name, request in services:
        choices = offers(request.pool_key)
        if not choices:
            plan.unplaceable[name] = explain(request.pool_key)
            continue
        boot = costs.durations.boot_s(choices[0].gpu.name)
        planned = PlannedMachine(request.pool_key, choices[0], boot, 0.0, service=name)
        planned.work_s = elapsed / workers
        plan.machines.append(planned)
    return plan


def _sharing(
    own: dict[GpuRequest, Offer],
    pools: dict[GpuRequest, list[str]],
    offers: Callable[[GpuRequest], list[Offer]],
    costs: CostModel,
) -> dict[GpuRequest, GpuRequest]:
    """Guest pool -> host pool: the pools whose every test is cheaper on the (cheapest)
    host's instance than on one of its own. Cheap pools are placed first, and a host is
    never a guest, so no instance is planned away that another pool counts on."""
    hosted: dict[GpuRequest, GpuRequest] = {}
    for pool in sorted(own, key=lambda p: own[p].price(p.count)):
        if pool in hosted.values():
            continue
        feasible = offers(pool)
        candidates = [
            host
            for host, offer in own.items()
            if host != pool
            and host not in hosted
            and hosts(host, offer, pool, feasible, own[pool])
            and all(
                costs.share_ok(offer.price(host.count), own[pool], pool.count, nodeid)
                for nodeid in pools[pool]
            )
        ]
        if candidates:
            hosted[pool] = min(candidates, key=lambda host: own[host].price(host.count))
    return hosted
