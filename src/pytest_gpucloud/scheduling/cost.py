"""The money: the cost model that choices use, and the meter.

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

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_gpucloud.core.catalog import Offer
    from pytest_gpucloud.machine.machine import Machine
    from pytest_gpucloud.scheduling.durations import Durations


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
    requested_at: float | None = None  # when the create call went out
    spot: bool = False
    leased: bool = False  # held whole by a gpu_cloud.instance() handle or a gpu_service

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
            m.requested_at,
            m.offer.spot,
            m.leased,
        )
        for m in machines
        if m.instance is not None and m.created_at is not None
    ]


def spent(machines: Iterable[Machine]) -> float:
    """The meter: what every instance of the session has cost so far."""
    return sum(bill.cost for bill in bills(machines))
