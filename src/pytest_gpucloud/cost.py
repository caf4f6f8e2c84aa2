"""The money: per-instance billed seconds and cost, per second and by the started hour."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_gpucloud.machine import Machine


@dataclass(frozen=True)
class Bill:
    """One instance's line of the cost report."""

    instance_id: str
    gpu: str
    region: str
    seconds: float
    price_per_hour: float
    tests: int

    @property
    def cost(self) -> float:
        return self.price_per_hour * math.ceil(self.seconds) / 3600

    @property
    def hourly_cost(self) -> float:
        return self.price_per_hour * max(1, math.ceil(self.seconds / 3600))


def bills(machines: Iterable[Machine]) -> list[Bill]:
    return [
        Bill(m.id, m.label.split(" ")[0], m.offer.region, m.seconds, m.price_per_hour, m.tests_run)
        for m in machines
        if m.instance is not None
    ]


def summary_lines(entries: list[Bill]) -> list[str]:
    if not entries:
        return ["no instance was created"]
    lines = [
        f"{b.instance_id:<12} {b.gpu:<12} {b.region:<14} {b.tests:>5} tests "
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
    return lines
