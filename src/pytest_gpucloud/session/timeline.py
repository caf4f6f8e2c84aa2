"""The session's timeline as SVG: one row per instance (requested, booting, ready, each test
as a block coloured by its outcome, idle, deleted) and one row for the local tests.

Drawn from the JSON run report (``--gpu-report``'s data) and the tests' outcomes, so the
picture and the report cannot disagree. Blocks narrower than :data:`MIN_BLOCK_PX` are merged
per pixel column (the worst outcome wins the column), so a row never holds more than
:data:`PLOT_WIDTH` merged rectangles, whatever the number of tests.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_gpucloud.session.outcomes import Record
from pytest_gpucloud.session.svg import Svg

LABEL_WIDTH = 220
PLOT_WIDTH = 960
RIGHT_MARGIN = 24
TOP = 58
ROW_HEIGHT = 14
ROW_GAP = 6
BOTTOM = 12
MIN_BLOCK_PX = 2.0
LOCAL_ROW = "local tests"

OUTCOME_COLOURS = {
    "passed": "#2da44e",
    "xpassed": "#2da44e",
    "failed": "#cf222e",
    "error": "#e16f24",
    "infrastructure error": "#8250df",
    "skipped": "#bf8700",
    "xfailed": "#bf8700",
    "unknown": "#6e7781",
}
PHASE_COLOURS = {"requested": "#d0d7de", "booting": "#54aeff", "idle": "#eaeef2"}
DELETED_COLOUR = "#24292f"
BACKGROUND = "#ffffff"
#: Which outcome a merged pixel column shows: the worst of its tests.
_RANK = (
    "passed",
    "xpassed",
    "skipped",
    "xfailed",
    "unknown",
    "error",
    "infrastructure error",
    "failed",
)


@dataclass(frozen=True)
class Block:
    """One test on a row: from its start to its end, and how it ended."""

    nodeid: str
    start: float
    end: float
    outcome: str


@dataclass
class Row:
    """An instance (``key`` its id) or the local tests (``key`` :data:`LOCAL_ROW`)."""

    key: str
    label: str
    requested_at: float | None = None
    created_at: float | None = None
    ready_at: float | None = None
    deleted_at: float | None = None
    blocks: list[Block] = field(default_factory=list)

    @property
    def is_instance(self) -> bool:
        return self.key != LOCAL_ROW


def rows(report: Mapping[str, Any], records: Iterable[Record]) -> list[Row]:
    """The rows of ``report`` (the ``--gpu-report`` data): its instances in order, then the
    local tests of ``records``."""
    by_id: dict[str, Row] = {}
    for entry in report["instances"]:
        count = "" if entry["count"] == 1 else f":{entry['count']}"
        by_id[entry["id"]] = Row(
            entry["id"],
            f"{entry['gpu_type']}{count} {entry['id']}",
            entry.get("requested_at"),
            entry["created_at"],
            entry["ready_at"],
            entry["deleted_at"],
        )
    records = list(records)
    outcome = {r.nodeid: r.outcome for r in records}
    for test in report["tests"]:
        row = by_id.get(test["instance"])
        if row is not None:
            start = test["started_at"]
            row.blocks.append(
                Block(
                    test["nodeid"],
                    start,
                    start + test["seconds"],
                    outcome.get(test["nodeid"], "unknown"),
                )
            )
    local = Row(LOCAL_ROW, LOCAL_ROW)
    local.blocks = [Block(r.nodeid, r.start, r.stop, r.outcome) for r in records if not r.remote]
    return [*by_id.values(), local]


def row_top(index: int) -> float:
    """The y of row ``index``'s top edge."""
    return TOP + index * (ROW_HEIGHT + ROW_GAP)


def height(row_count: int) -> float:
    return row_top(row_count) + BOTTOM


def render(rows: list[Row], *, now: float) -> str:
    """The SVG document; ``now`` stands in for times that have not happened (an instance
    that was never deleted)."""
    start, end = _span(rows, now)
    scale = PLOT_WIDTH / max(end - start, 1e-3)

    def x(t: float) -> float:
        return LABEL_WIDTH + (t - start) * scale

    width = LABEL_WIDTH + PLOT_WIDTH + RIGHT_MARGIN
    svg = Svg(width, height(len(rows)))
    svg.rect(0, 0, width, svg.height, fill=BACKGROUND)
    tests = sum(len(r.blocks) for r in rows)
    instances = sum(1 for r in rows if r.is_instance)
    svg.text(
        8,
        16,
        f"gpu-cloud timeline: {instances} instance(s), {tests} test(s), "
        f"{_clock(end - start)} from first request to last delete",
        font_weight="bold",
        font_size="12",
    )
    _legend(svg, 8, 32)
    _axis(svg, start, end, x, len(rows))
    for index, row in enumerate(rows):
        top = row_top(index)
        svg.open_group(data_row=row.key)
        svg.text(LABEL_WIDTH - 8, top + ROW_HEIGHT - 3, row.label, text_anchor="end")
        if row.is_instance:
            _phases(svg, row, top, x, now)
        _blocks(svg, row.blocks, top, x)
        svg.close_group()
    return svg.render()


def _span(rows: list[Row], now: float) -> tuple[float, float]:
    times = [
        t
        for row in rows
        for t in (row.requested_at, row.created_at, row.ready_at, row.deleted_at)
        if t is not None
    ]
    times += [t for row in rows for b in row.blocks for t in (b.start, b.end)]
    if not times:
        return now, now + 1
    return min(times), max(times)


def _legend(svg: Svg, x0: float, y: float) -> None:
    entries = [
        ("requested", PHASE_COLOURS["requested"]),
        ("booting", PHASE_COLOURS["booting"]),
        ("idle", PHASE_COLOURS["idle"]),
        ("passed", OUTCOME_COLOURS["passed"]),
        ("failed", OUTCOME_COLOURS["failed"]),
        ("error", OUTCOME_COLOURS["error"]),
        ("infrastructure error", OUTCOME_COLOURS["infrastructure error"]),
        ("skipped", OUTCOME_COLOURS["skipped"]),
        ("deleted", DELETED_COLOUR),
    ]
    x = x0
    for name, colour in entries:
        svg.rect(x, y - 9, 10, 10, fill=colour)
        svg.text(x + 14, y, name)
        x += 22 + 6.2 * len(name)


def _axis(svg: Svg, start: float, end: float, x: Any, row_count: int) -> None:
    step = _tick_step(end - start)
    bottom = row_top(row_count) - ROW_GAP
    tick = 0.0
    while start + tick <= end + 1e-9:
        at = x(start + tick)
        svg.line(at, TOP - 6, at, bottom, stroke="#d8dee4", stroke_width="0.5")
        svg.text(at, TOP - 9, _clock(tick), text_anchor="middle", fill="#57606a", font_size="9")
        tick += step


def _tick_step(span: float) -> float:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if span / step <= 10:
            return float(step)
    return 3600.0 * math.ceil(span / 36000)


def _clock(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 and seconds % 1 else f"{seconds:.0f} s"
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _phases(svg: Svg, row: Row, top: float, x: Any, now: float) -> None:
    end = row.deleted_at if row.deleted_at is not None else now
    quarter = ROW_HEIGHT / 4
    if row.requested_at is not None and row.created_at is not None:
        svg.rect(
            x(row.requested_at),
            top + quarter,
            max(x(row.created_at) - x(row.requested_at), 1),
            ROW_HEIGHT / 2,
            fill=PHASE_COLOURS["requested"],
            title="requested",
        )
    if row.created_at is not None:
        booted = row.ready_at if row.ready_at is not None else end
        svg.rect(
            x(row.created_at),
            top,
            max(x(booted) - x(row.created_at), 1),
            ROW_HEIGHT,
            fill=PHASE_COLOURS["booting"],
            title="booting",
        )
    if row.ready_at is not None:
        svg.rect(
            x(row.ready_at),
            top,
            max(x(end) - x(row.ready_at), 0),
            ROW_HEIGHT,
            fill=PHASE_COLOURS["idle"],
            title="ready (idle where no test runs)",
        )
    if row.deleted_at is not None:
        at = x(row.deleted_at)
        svg.line(at, top - 2, at, top + ROW_HEIGHT + 2, stroke=DELETED_COLOUR, stroke_width="2")
    else:
        svg.text(x(end) + 3, top + ROW_HEIGHT - 3, "not deleted", fill=OUTCOME_COLOURS["failed"])


def _blocks(svg: Svg, blocks: list[Block], top: float, x: Any) -> None:
    columns: dict[int, list[str]] = {}
    starts: Counter[int] = Counter()  # short tests counted once, at their first column
    for block in sorted(blocks, key=lambda b: b.start):
        left, right = x(block.start), x(block.end)
        if right - left >= MIN_BLOCK_PX:
            svg.rect(
                left,
                top,
                right - left,
                ROW_HEIGHT,
                fill=_colour(block.outcome),
                stroke=BACKGROUND,
                stroke_width="0.5",
                title=f"{block.nodeid}: {block.outcome}, {block.end - block.start:.2f} s",
            )
            continue
        starts[math.floor(left)] += 1
        for column in range(math.floor(left), max(math.floor(left), math.ceil(right) - 1) + 1):
            columns.setdefault(column, []).append(block.outcome)
    for first, last, outcome, count in _runs(columns, starts):
        svg.rect(
            first,
            top,
            last + 1 - first,
            ROW_HEIGHT,
            fill=_colour(outcome),
            title=f"{count} short test(s), the worst {outcome}",
        )


def _runs(columns: dict[int, list[str]], starts: Counter[int]) -> list[tuple[int, int, str, int]]:
    """Adjacent pixel columns of the same worst outcome, as (first, last, outcome, tests)."""
    runs: list[tuple[int, int, str, int]] = []
    for column in sorted(columns):
        outcome = max(columns[column], key=_worst)
        count = starts[column]
        if runs and runs[-1][1] == column - 1 and runs[-1][2] == outcome:
            first, _, _, before = runs[-1]
            runs[-1] = (first, column, outcome, before + count)
        else:
            runs.append((column, column, outcome, count))
    return runs


def _worst(outcome: str) -> int:
    return _RANK.index(outcome) if outcome in _RANK else _RANK.index("unknown")


def _colour(outcome: str) -> str:
    return OUTCOME_COLOURS.get(outcome, OUTCOME_COLOURS["unknown"])
