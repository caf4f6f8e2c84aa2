"""The job summary: the session as markdown for ``$GITHUB_STEP_SUMMARY`` (or
``--gpu-summary-md``), from the JSON run report and the tests' outcomes."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_gpucloud.scheduling.cost import billed_hourly
from pytest_gpucloud.session.markdown import cell, code
from pytest_gpucloud.session.outcomes import Record, counts

FAILED = ("failed", "error")
#: GitHub takes 1 MiB of job summary per step: a larger timeline is left out.
MAX_EMBEDDED = 700_000


def job_summary(
    report: Mapping[str, Any], records: Sequence[Record], *, timeline_svg: str | None = None
) -> str:
    """The markdown; ``timeline_svg`` is embedded as an image when given."""
    counted = counts(records)
    total = sum(counted.values())
    lines = [
        "## gpu-cloud",
        "",
        f"**{total} test(s):** " + (", ".join(f"{n} {o}" for o, n in counted.items()) or "none"),
        "",
        *_instances(report),
    ]
    if report.get("budget") is not None:
        lines += [f"Budget: ${report['budget']:.4f}, ${report['total_cost']:.4f} spent.", ""]
    failed = [r for r in records if r.remote and r.outcome in FAILED]
    if failed:
        lines += ["### Failed remote tests", "", "| test | instance | artifacts |"]
        lines.append("|---|---|---|")
        lines += [
            f"| {code(r.nodeid)} ({r.outcome}) | {code(r.instance or '')} | "
            f"{code(r.artifacts) if r.artifacts else 'none'} |"
            for r in failed
        ]
        lines.append("")
    infra = [r for r in records if r.outcome == "infrastructure error"]
    if infra:
        lines += ["### Infrastructure errors (not test failures)", ""]
        lines += [f"- {code(r.nodeid)}: {cell(_first_line(r.message))}" for r in infra]
        lines.append("")
    if timeline_svg is not None:
        data = base64.b64encode(timeline_svg.encode()).decode()
        image = f'<img alt="timeline" src="data:image/svg+xml;base64,{data}">'
        if len(data) > MAX_EMBEDDED:
            image = "The timeline is too large to embed here: see the --gpu-timeline file."
        lines += ["### Timeline", "", image, ""]
    return "\n".join(lines) + "\n"


def _instances(report: Mapping[str, Any]) -> list[str]:
    instances = report["instances"]
    if not instances:
        return ["No instance was created.", ""]
    lines = [
        "| instance | type | region | spot | tests | seconds | cost | cost if billed hourly |",
        "|---|---|---|---|--:|--:|--:|--:|",
    ]
    hourly = 0.0
    for entry in instances:
        count = "" if entry["count"] == 1 else f":{entry['count']}"
        by_hour = billed_hourly(entry["price_per_hour"], entry["seconds"])
        hourly += by_hour
        lines.append(
            f"| {code(entry['id'])} | {entry['gpu_type']}{count} | {entry['region']} | "
            f"{'yes' if entry.get('spot') else 'no'} | {entry['tests']} | "
            f"{entry['seconds']:.1f} | ${entry['cost']:.4f} | ${by_hour:.2f} |"
        )
    lines.append(
        f"| **total** | | | | **{sum(e['tests'] for e in instances)}** | "
        f"**{sum(e['seconds'] for e in instances):.1f}** | **${report['total_cost']:.4f}** | "
        f"**${hourly:.2f}** |"
    )
    return [*lines, ""]


def _first_line(text: str) -> str:
    return text.partition("\n")[0]
