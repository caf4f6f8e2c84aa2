"""What a session tells about its instances at the end: the terminal summary's section and
the JSON run report (``--gpu-report``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_gpucloud.core.units import format_dollars
from pytest_gpucloud.scheduling.cost import Bill, bills

if TYPE_CHECKING:
    from pytest_gpucloud.config.settings import Settings
    from pytest_gpucloud.desk.service import Outcome
    from pytest_gpucloud.machine.machine import Machine
    from pytest_gpucloud.scheduling.cost import Placement
    from pytest_gpucloud.scheduling.planner import Plan

SIMULATED_NOTE = (
    "the simulated GPU cloud: instances are processes on this machine and "
    '"GPU" tests run on its CPU, with its Python; images (--gpu-image, gpu(image=...)) '
    "are not pulled"
)


def summary_lines(entries: list[Bill], budget: float | None = None) -> list[str]:
    if not entries:
        return ["no instance was created"]
    lines = [
        f"{b.instance_id:<12} {_gpu(b):<12} {b.region:<14} {_use(b)} {b.seconds:>8.1f} s  "
        f"${b.cost:.4f}"
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
        lines.append(f"budget: {format_dollars(budget)}, {format_dollars(total)} spent")
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
                "requested_at": b.requested_at,
                "created_at": b.created_at,
                "ready_at": b.ready_at,
                "deleted_at": b.deleted_at,
                "seconds": round(b.seconds, 3),
                "billed_seconds": math.ceil(max(0.0, b.seconds)),
                "cost": round(b.cost, 6),
                "tests": b.tests,
                "leased": b.leased,
                "spot": b.spot,
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


def _use(bill: Bill) -> str:
    """``  3 tests``, or ``   leased`` for an instance held by a handle or a service."""
    if bill.leased and not bill.tests:
        return f"{'leased':>11}"
    return f"{bill.tests:>5} {'test ' if bill.tests == 1 else 'tests'}"


def _gpu(bill: Bill) -> str:
    name = bill.gpu if bill.count == 1 else f"{bill.gpu}:{bill.count}"
    return f"{name} spot" if bill.spot else name


def terminal_lines(
    outcome: Outcome,
    *,
    settings: Settings,
    simulated: bool,
    verbose: bool,
    failed: list[str],
    infra_errors: int,
    stayed: Sequence[str] = (),
) -> list[tuple[str, dict[str, bool]]]:
    """The ``gpu-cloud`` section of the terminal summary: each line with its markup.
    ``stayed``: the files the sync left on this machine (secret-shaped, .gpucloudignore)."""
    lines: list[tuple[str, dict[str, bool]]] = []
    if simulated:
        lines.append((f"provider sim: {SIMULATED_NOTE}", {}))
    if settings.plan and outcome.plan is not None:
        for line in outcome.plan.lines(verbose=verbose, budget=settings.budget):
            lines.append((line, {}))
        lines.append(("--gpu-plan: no instance was created and no test ran", {}))
        return lines
    lines += [(line, {}) for line in summary_lines(bills(outcome.machines), settings.budget)]
    lines += [(line, {}) for line in outcome.data_lines]
    if outcome.artifacts is not None:
        for line, warn in outcome.artifacts.summary_lines(failed):
            lines.append((line, {"yellow": warn}))
    if infra_errors:
        lines.append(
            (
                f"gpu-cloud: {infra_errors} infrastructure error(s): test(s) that could "
                "not run or finish on an instance (not test failures; see the ERRORs above)",
                {"yellow": True},
            )
        )
    for machine in outcome.machines:
        if machine.error:
            # one line a machine: the whole message is its test's ERROR report already
            lines.append((f"{machine.id}: {_first_line(machine.error)}", {"yellow": True}))
    lines += [(note, {"yellow": True}) for note in outcome.notes]
    if stayed:
        shown = ", ".join(stayed[:10]) + (" ..." if len(stayed) > 10 else "")
        lines.append(
            (
                f"gpu-cloud: {len(stayed)} file(s) stayed on this machine (secret-shaped, or in "
                f".gpucloudignore): {shown} (a '!name' line in .gpucloudignore sends one)",
                {},
            )
        )
    if outcome.orphans:
        lines.append(
            (
                "gpu-cloud: these instances could not be deleted and may still cost money: "
                + ", ".join(outcome.orphans)
                + " (delete them in your cloud console or with python -m pytest_gpucloud cleanup)",
                {"red": True},
            )
        )
    return lines


def _first_line(message: str) -> str:
    return message.splitlines()[0].removesuffix("; its last output:")
