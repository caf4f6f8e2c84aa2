"""``make bench``: run the benchmarks of bench/ and write bench/results.md.

Each benchmark is a module of this folder whose ``main()`` returns its figures: a dict (one
row) or a list of them, each ``{name, value, baseline, ratio, target, unit}`` with an
optional ``ok`` (met or not; for a numeric ``target`` it is ``value <= target``). A module
may keep ``NOTES`` (a list of markdown paragraphs), shown under its name below the table.

``python bench/run.py [NAME...]`` runs the named benchmarks only (default: all of
``BENCHMARKS``); a module that is not there yet is listed as missing, and one that fails
is reported with its error, without stopping the others; the exit status is then 1. A
target not met is shown in the table (``met``: **no**), not as a failure of the run.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCHMARKS = (
    "plan",
    "sync",
    "openssh",
    "xdist_ssh",
    "overhead",
    "fanout",
    "faults",
    "artifacts",
    "service",
)
RESULTS = Path(__file__).with_name("results.md")
COLUMNS = ("figure", "value", "baseline (same run)", "ratio", "target", "met")


def normalize(module: str, result: object) -> list[dict[str, Any]]:
    """The rows of one ``main()`` result, whatever its shape (a dict or a list of dicts)."""
    rows = [result] if isinstance(result, dict) else result
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise TypeError(f"{module}.main() returned {type(result).__name__}, not rows")
    normalized = []
    for row in rows:
        target, value, ok = row.get("target"), row.get("value"), row.get("ok")
        if ok is None and isinstance(target, (int, float)) and isinstance(value, (int, float)):
            ok = value <= target
        normalized.append({**row, "module": module, "ok": ok})
    return normalized


def _cell(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip() if isinstance(value, (int, float)) else text


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        unit = str(row.get("unit") or "")
        target = row.get("target")
        cells = [
            f"{row['module']}: {row['name']}",
            _cell(row.get("value"), unit),
            _cell(row.get("baseline"), unit),
            _cell(row.get("ratio")),
            _cell(target, unit) if isinstance(target, (int, float)) else _cell(target),
            {True: "yes", False: "**no**", None: "-"}[row["ok"]],
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def machine_facts() -> str:
    return (
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {os.cpu_count()} CPUs "
        f"(nproc {len(os.sched_getaffinity(0))}), load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the start; Python "
        f"{platform.python_version()}; {platform.platform()}"
    )


def run(names: list[str]) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Run the benchmarks ``names``: the rows, the markdown sections of their notes, and
    whether every one ran."""
    sys.path.insert(0, str(Path(__file__).parent))
    rows: list[dict[str, Any]] = []
    sections: list[str] = []
    ran = True
    for name in names:
        print(f"bench: {name}", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            sections.append(f"### {name}\n\nNot run: bench/{name}.py is not there.")
            continue
        try:
            found = normalize(name, module.main())
        except Exception as exc:
            traceback.print_exc()
            ran = False
            sections.append(f"### {name}\n\n**Failed**: `{type(exc).__name__}: {exc}`")
            continue
        seconds = time.perf_counter() - started
        rows += found
        notes = [str(note) for note in getattr(module, "NOTES", [])]
        doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        body = "\n\n".join([doc, *notes, f"({seconds:.0f} s)"])
        sections.append(f"### {name}\n\n{body}")
    return rows, sections, ran


def write(rows: list[dict[str, Any]], sections: list[str], facts: str, names: list[str]) -> None:
    subset = "" if list(names) == list(BENCHMARKS) else f" (only: {', '.join(names)})"
    text = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`bench/run.py`){subset}. Every baseline is measured in the "
        "same run as its figure, on the same machine; ratio = value / baseline.",
        "",
        f"Machine: {facts}.",
        "",
        *table(rows),
        "",
        "## Notes",
        "",
        "\n\n".join(sections),
        "",
    ]
    RESULTS.write_text("\n".join(text))
    print(f"bench: wrote {RESULTS}")


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    facts = machine_facts()
    rows, sections, ran = run(names)
    write(rows, sections, facts, names)
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
