"""The money: the cost model that choices use, the meter, and the cost report.

Cost model (all in USD, prices per hour of the whole instance; ``d`` is a test's expected
seconds and ``b`` a GPU type's expected boot seconds, see
:mod:`pytest_gpucloud.scheduling.durations`):

- a test on a new instance of offer ``o`` costs ``o.price * (b + d) / 3600``;
- a test on a running, idle instance ``m`` costs ``m.price * d / 3600``;
- a test shares a running instance of another kind when that is not dearer (:meth:`CostModel.
  share_ok`), comparing with the cheapest offer it could have had.

Billing is per second (seconds rounded up) from the create call's answer to the delete
request; the report also shows what billing by the started hour would have cost.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_gpucloud.core.catalog import Offer
    from pytest_gpucloud.machine.machine import Machine
    from pytest_gpucloud.scheduling.durations import Durations
    from pytest_gpucloud.scheduling.planner import Plan


def billed(price_per_hour: float, seconds: float) -> float:
    """Per-second billing: every started second."""
    return price_per_hour * math.ceil(max(0.0, seconds)) / 3600


def billed_hourly(price_per_hour: float, seconds: float) -> float:
    """Billing by the started hour (at least one)."""
    return price_per_hour * max(1, math.ceil(max(0.0, seconds) / 3600))


@dataclass(frozen=True)
class CostModel:
    """Expected costs of running a test here or there (module docstring)."""

    durations: Durations

    def new(self, offer: Offer, count: int, nodeid: str) -> float:
        """Booting a new instance of ``offer`` and running the test on it."""
        seconds = self.durations.boot_s(offer.gpu.name) + self.durations.test_s(nodeid)
        return offer.price(count) * seconds / 3600

    def on_running(self, price_per_hour: float, nodeid: str) -> float:
        """Running the test on an instance that is up already."""
        return price_per_hour * self.durations.test_s(nodeid) / 3600

    def share_ok(self, price_per_hour: float, cheapest: Offer, count: int, nodeid: str) -> bool:
        """Whether the test should run on a running instance of this price rather than on a
        new instance of ``cheapest``, its own best offer."""
        return self.on_running(price_per_hour, nodeid) <= self.new(cheapest, count, nodeid)


@dataclass(frozen=True, slots=True)  # one per remote test, kept to the end
class Placement:
    """Where one remote test ran, when it started there and its seconds (lease to result)."""

    instance_id: str
    started_at: float
    seconds: float


@dataclass(frozen=True)
class Bill:
    """One instance's line of the cost report."""

    instance_id: str
    gpu: str
    count: int
    region: str
    price_per_hour: float
    created_at: float
    ready_at: float | None
    deleted_at: float | None
    tests: int

    @property
    def seconds(self) -> float:
        return max(0.0, (self.deleted_at or time.time()) - self.created_at)

    @property
    def cost(self) -> float:
        return billed(self.price_per_hour, self.seconds)

    @property
    def hourly_cost(self) -> float:
        return billed_hourly(self.price_per_hour, self.seconds)


def bills(machines: Iterable[Machine]) -> list[Bill]:
    """A bill for every machine whose instance was created."""
    return [
        Bill(
            m.id,
            m.offer.gpu.name,
            m.count,
            m.offer.region,
            m.price_per_hour,
            m.created_at,
            m.ready_at,
            m.deleted_at,
            m.tests_run,
        )
        for m in machines
        if m.instance is not None and m.created_at is not None
    ]


def spent(machines: Iterable[Machine]) -> float:
    """The meter: what every instance of the session has cost so far."""
    return sum(bill.cost for bill in bills(machines))


def summary_lines(entries: list[Bill], budget: float | None = None) -> list[str]:
    if not entries:
        return ["no instance was created"]
    lines = [
        f"{b.instance_id:<12} {_gpu(b):<12} {b.region:<14} {b.tests:>5} tests "
        f"{b.seconds:>8.1f} s  ${b.cost:.4f}"
        for b in entries
    ]
    total = sum(b.cost for b in entries)
    hourly = sum(b.hourly_cost for b in entries)
    seconds = sum(b.seconds for b in entries)
    lines.append(
        f"total: {len(entries)} instance(s), {seconds:.1f} s, ${total:.4f} billed per second "
        f"(${hourly:.2f} if billed by the started hour)"
    )
    if budget is not None:
        lines.append(f"budget: ${budget:.4f}, ${total:.4f} spent")
    return lines


def report(
    machines: Iterable[Machine],
    placements: Mapping[str, Placement],
    *,
    budget: float | None,
    plan: Plan | None,
) -> dict[str, Any]:
    """The JSON run report (``--gpu-report``); its fields are documented in the README."""
    machines = list(machines)
    phases = {m.id: m.phases.to_json() for m in machines}
    entries = bills(machines)
    return {
        "currency": "USD",
        "instances": [
            {
                "id": b.instance_id,
                "gpu_type": b.gpu,
                "count": b.count,
                "region": b.region,
                "price_per_hour": b.price_per_hour,
                "created_at": b.created_at,
                "ready_at": b.ready_at,
                "deleted_at": b.deleted_at,
                "seconds": round(b.seconds, 3),
                "billed_seconds": math.ceil(max(0.0, b.seconds)),
                "cost": round(b.cost, 6),
                "tests": b.tests,
                "phases": phases[b.instance_id],
            }
            for b in entries
        ],
        "tests": [
            {
                "nodeid": nodeid,
                "instance": p.instance_id,
                "started_at": p.started_at,
                "seconds": round(p.seconds, 3),
            }
            for nodeid, p in placements.items()
        ],
        "total_cost": round(sum(b.cost for b in entries), 6),
        "hourly_cost": round(sum(b.hourly_cost for b in entries), 6),
        "budget": budget,
        "plan": None if plan is None else plan.to_json(),
    }


def write_report(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _gpu(bill: Bill) -> str:
    return bill.gpu if bill.count == 1 else f"{bill.gpu}:{bill.count}"
