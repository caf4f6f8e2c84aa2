"""The plan as markdown (``--gpu-plan --gpu-plan-md PATH``): a pull-request comment in the
manner of ``terraform plan``: the instances, their tests, the expected seconds and cost,
and the offers not taken and why."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pytest_gpucloud.core.request import GpuRequest
from pytest_gpucloud.scheduling.planner import Plan
from pytest_gpucloud.scheduling.rejections import Rejection
from pytest_gpucloud.session.markdown import code

SHOWN_TESTS = 10


def plan_markdown(
    plan: Plan,
    rejections: Mapping[GpuRequest, Sequence[Rejection]],
    *,
    budget: float | None = None,
) -> str:
    tests = sum(len(m.tests) for m in plan.machines)
    lines = [
        "## gpu-cloud plan",
        "",
        f"{len(plan.machines)} instance(s), {tests} remote test(s), {plan.seconds:.0f} s "
        f"expected, ${plan.cost:.4f} (at most {plan.max_instances} alive at once); "
        f"{plan.local_tests} local test(s).",
        "",
    ]
    if plan.machines:
        lines += [
            "| instance | request | price | tests | expected seconds | expected cost |",
            "|---|---|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {m.name} | {code(m.pool.spec)} | ${m.price_per_hour:.2f}/h | {len(m.tests)} | "
            f"{m.seconds:.0f} | ${m.cost:.4f} |"
            for m in plan.machines
        ]
        lines += [
            f"| **total** | | | **{tests}** | **{plan.seconds:.0f}** | **${plan.cost:.4f}** |",
            "",
        ]
    if budget is not None:
        verdict = "within" if plan.cost <= budget else "MORE than"
        lines += [f"Expected cost {verdict} the budget of ${budget:.4f}.", ""]
    for index, machine in enumerate(plan.machines, 1):
        shown = machine.tests[:SHOWN_TESTS]
        more = len(machine.tests) - len(shown)
        listed = ", ".join(code(t) for t in shown) + (f" and {more} more" if more else "")
        lines.append(f"{index}. {machine.name}: {listed}")
    if plan.machines:
        lines.append("")
    if plan.unplaceable:
        lines += ["### Tests with no offer", ""]
        lines += [f"- {code(nodeid)}: {why}" for nodeid, why in plan.unplaceable.items()]
        lines.append("")
    rows = [(pool, r) for pool, found in rejections.items() for r in found]
    if rows:
        lines += ["### Offers not taken", "", "| request | offer | price | why |"]
        lines.append("|---|---|--:|---|")
        lines += [
            f"| {code(pool.spec)} | {r.offer.gpu.name} in {r.offer.region} | "
            f"${r.price_per_hour:.2f}/h | {r.why} |"
            for pool, r in rows
        ]
        lines.append("")
    return "\n".join(lines)
