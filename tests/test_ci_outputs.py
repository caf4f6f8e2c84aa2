"""What a session leaves for CI: the job summary, the plan as markdown, GitHub annotations
and the timeline (rendered by headless chromium and compared with the run report)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pytest_gpucloud.session import timeline
from pytest_gpucloud.session.annotations import (
    annotation_lines,
    command,
    escape_data,
    escape_property,
)
from pytest_gpucloud.session.outcomes import Record
from pytest_gpucloud.session.summary_md import job_summary
from tests.browser import chromium, render_png
from tests.cloud import GpuRun

SESSION_TESTS = """\
import time

import pytest


@pytest.mark.gpu("T4")
def test_remote_passes():
    time.sleep(0.3)


@pytest.mark.gpu("T4")
def test_remote_fails(gpu_artifacts):
    (gpu_artifacts / "log.txt").write_text("loss went up")
    time.sleep(0.3)
    assert 2 + 2 == 5


@pytest.mark.parametrize("n", range(3))
def test_local(n):
    time.sleep(0.3)
    if n == 2:
        pytest.skip("not today")
"""


# -- annotations -----------------------------------------------------------------------------


def test_annotation_text_is_escaped_as_the_runner_reads_it() -> None:
    assert escape_data("100% done\r\nnext, a: b") == "100%25 done%0D%0Anext, a: b"
    assert escape_property("a,b:c%\n") == "a%2Cb%3Ac%25%0A"
    assert command("error", "x\ny", file="t.py", line=3, title="t::a, b") == (
        "::error file=t.py,line=3,title=t%3A%3Aa%2C b::x%0Ay"
    )
    assert command("warning", "plain") == "::warning::plain"


def test_annotations_of_failed_remote_tests_and_infrastructure_errors() -> None:
    records = [
        Record("t.py::ok", "passed", instance="T4 i-1"),
        Record(
            "t.py::bad",
            "failed",
            instance="T4 i-1",
            location=("t.py", 10),
            crash=("t.py", 12),
            message="assert 1 == 2",
        ),
        Record("t.py::setup", "error", instance="T4 i-1", location=("t.py", 20)),
        Record("t.py::local", "failed", location=("t.py", 30), message="local failure"),
        Record(
            "t.py::lost",
            "infrastructure error",
            message="gpu-cloud: instance i-2 was lost: preempted\n(2 tests moved)",
        ),
        Record("t.py::nothing", "infrastructure error", message="gpu-cloud: no offer"),
    ]
    assert annotation_lines(records, ["i-1", "i-2"], prefix="sub/") == [
        "::error file=sub/t.py,line=12,title=t.py%3A%3Abad failed on T4 i-1::assert 1 == 2",
        "::error file=sub/t.py,line=20,title=t.py%3A%3Asetup error on T4 i-1::error",
        "::warning title=gpu-cloud infrastructure error (instance i-2)::t.py::lost: gpu-cloud: "
        "instance i-2 was lost: preempted%0A(2 tests moved)",
        "::warning title=gpu-cloud infrastructure error (instance none)::t.py::nothing: "
        "gpu-cloud: no offer",
    ]


# -- the job summary -------------------------------------------------------------------------

REPORT: dict[str, Any] = {
    "instances": [
        {
            "id": "i-1",
            "gpu_type": "T4",
            "count": 1,
            "region": "us-east-1",
            "price_per_hour": 0.53,
            "requested_at": 99.0,
            "created_at": 100.0,
            "ready_at": 130.0,
            "deleted_at": 172.5,
            "seconds": 72.5,
            "cost": 0.010749,
            "tests": 2,
        },
        {
            "id": "i-2",
            "gpu_type": "A100-80GB",
            "count": 2,
            "region": "eu-west-1",
            "price_per_hour": 4.98,
            "requested_at": 100.0,
            "created_at": 101.0,
            "ready_at": 140.0,
            "deleted_at": 3800.0,
            "seconds": 3699.0,
            "cost": 5.11695,
            "tests": 1,
        },
    ],
    "tests": [
        {"nodeid": "t.py::a", "instance": "i-1", "started_at": 131.0, "seconds": 10.0},
        {"nodeid": "t.py::b|c", "instance": "i-1", "started_at": 141.0, "seconds": 20.0},
        {"nodeid": "t.py::big", "instance": "i-2", "started_at": 141.0, "seconds": 3600.0},
    ],
    "total_cost": 5.127699,
    "hourly_cost": 10.49,
    "budget": 10.0,
}
RECORDS = [
    Record("t.py::a", "passed", 131.0, 141.0, instance="T4 i-1"),
    Record(
        "t.py::b|c",
        "failed",
        141.0,
        161.0,
        instance="T4 i-1",
        artifacts=".gpucloud/artifacts/r1/t.py__b-c-1f2e",
    ),
    Record("t.py::big", "passed", 141.0, 3741.0, instance="A100-80GB:2 i-2"),
    Record("t.py::lost", "infrastructure error", message="gpu-cloud: i-3 was lost"),
    Record("t.py::local", "passed", 100.0, 100.5),
    Record("t.py::skip", "skipped", 100.5, 100.6),
]


def test_summary_markdown_of_a_small_session() -> None:
    assert job_summary(REPORT, RECORDS).splitlines() == [
        "## gpu-cloud",
        "",
        "**6 test(s):** 3 passed, 1 failed, 1 infrastructure error, 1 skipped",
        "",
        "| instance | type | region | spot | tests | seconds | cost | cost if billed hourly |",
        "|---|---|---|---|--:|--:|--:|--:|",
        "| `i-1` | T4 | us-east-1 | no | 2 | 72.5 | $0.0107 | $0.53 |",
        "| `i-2` | A100-80GB:2 | eu-west-1 | no | 1 | 3699.0 | $5.1170 | $9.96 |",
        "| **total** | | | | **3** | **3771.5** | **$5.1277** | **$10.49** |",
        "",
        "Budget: $10.0000, $5.1277 spent.",
        "",
        "### Failed remote tests",
        "",
        "| test | instance | artifacts |",
        "|---|---|---|",
        "| `t.py::b\\|c` (failed) | `T4 i-1` | `.gpucloud/artifacts/r1/t.py__b-c-1f2e` |",
        "",
        "### Infrastructure errors (not test failures)",
        "",
        "- `t.py::lost`: gpu-cloud: i-3 was lost",
        "",
    ]


def test_summary_of_a_session_that_created_nothing() -> None:
    empty = {"instances": [], "tests": [], "total_cost": 0, "budget": None}
    local = [Record("t.py::x", "passed")]
    assert job_summary(empty, local).splitlines() == [
        "## gpu-cloud",
        "",
        "**1 test(s):** 1 passed",
        "",
        "No instance was created.",
        "",
    ]


def test_a_session_appends_its_summary_and_draws_its_timeline(
    gpu_run: GpuRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_summary = tmp_path / "step-summary.md"
    step_summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    gpu_run.pytester.makepyfile(test_session=SESSION_TESTS)
    result = gpu_run("-p", "no:randomly", "--gpu-report", "r.json", "--gpu-timeline", "t.svg")
    result.assert_outcomes(passed=3, failed=1, skipped=1)
    report = json.loads((gpu_run.pytester.path / "r.json").read_text())
    (instance,) = report["instances"]
    text = step_summary.read_text()
    assert text.startswith("earlier step\n## gpu-cloud\n")
    lines = text.splitlines()
    assert "**5 test(s):** 3 passed, 1 failed, 1 skipped" in lines
    row = next(line for line in lines if line.startswith(f"| `{instance['id']}` |"))
    assert re.fullmatch(
        r"\| `i-\w+` \| T4 \| [\w-]+ \| no \| 2 \| [\d.]+ \| \$[\d.]+ \| \$0\.53 \|", row
    )
    failed = next(line for line in lines if "test_remote_fails" in line)
    assert re.fullmatch(
        rf"\| `test_session.py::test_remote_fails` \(failed\) \| `T4 {instance['id']}` \| "
        r"`.gpucloud/artifacts/[\w-]+/test_session.py_test_remote_fails-\w+` \|",
        failed,
    )
    svg = (gpu_run.pytester.path / "t.svg").read_text()
    assert re.findall(r'<g data-row="([^"]+)"', svg) == [instance["id"], timeline.LOCAL_ROW]


# -- the plan as markdown --------------------------------------------------------------------


def test_plan_markdown_lists_instances_tests_costs_and_offers_not_taken(gpu_run: GpuRun) -> None:
    gpu_run.pytester.makepyfile(
        test_plan="""
        import pytest

        @pytest.mark.gpu("L4")
        def test_a(): pass

        @pytest.mark.gpu("L4")
        def test_b(): pass

        @pytest.mark.gpu("B200")
        def test_big(): pass

        def test_local(): pass
        """
    )
    result = gpu_run(
        "-p", "no:randomly", "--gpu-plan", "--gpu-plan-md", "plan.md", "--gpu-region", "eu-*"
    )
    assert result.ret == 0
    assert gpu_run.sim.live() == []
    assert (gpu_run.pytester.path / "plan.md").read_text().splitlines() == [
        "## gpu-cloud plan",
        "",
        "1 instance(s), 2 remote test(s), 150 s expected, $0.0292 (at most 8 alive at once); "
        "1 local test(s).",
        "",
        "| instance | request | price | tests | expected seconds | expected cost |",
        "|---|---|--:|--:|--:|--:|",
        "| L4 in eu-west-1 | `L4` | $0.70/h | 2 | 150 | $0.0292 |",
        "| **total** | | | **2** | **150** | **$0.0292** |",
        "",
        "1. L4 in eu-west-1: `test_plan.py::test_a`, `test_plan.py::test_b`",
        "",
        "### Tests with no offer",
        "",
        "- `test_plan.py::test_big`: no offer for B200 in regions eu-*: B200 is offered in "
        "us-east-1",
        "",
        "### Offers not taken",
        "",
        "| request | offer | price | why |",
        "|---|---|--:|---|",
        "| `L4` | L4 in us-east-1 | $0.70/h | region not allowed by --gpu-region |",
    ]


# -- the timeline ----------------------------------------------------------------------------


def test_timeline_rows_follow_the_report_and_merge_blocks_below_a_pixel() -> None:
    instances, per_instance = 50, 100  # 5,000 tests of 0.05 s in an hour-long session
    report: dict[str, Any] = {"instances": [], "tests": []}
    records = []
    for n in range(instances):
        report["instances"].append(
            {
                "id": f"i-{n:02d}",
                "gpu_type": "T4",
                "count": 1,
                "requested_at": 0.0,
                "created_at": 1.0,
                "ready_at": 60.0,
                "deleted_at": 3600.0,
            }
        )
        for k in range(per_instance):
            nodeid = f"t.py::test[{n}-{k}]"
            report["tests"].append(
                {
                    "nodeid": nodeid,
                    "instance": f"i-{n:02d}",
                    "started_at": 60 + k * 0.05,
                    "seconds": 0.05,
                }
            )
            outcome = "failed" if k == 50 else "passed"
            records.append(Record(nodeid, outcome, instance=f"T4 i-{n:02d}"))
    rows = timeline.rows(report, records)
    svg = timeline.render(rows, now=3600.0)
    assert re.findall(r'<g data-row="([^"]+)"', svg) == [
        *(f"i-{n:02d}" for n in range(instances)),
        timeline.LOCAL_ROW,
    ]
    # 100 tests in 5 s of an hour are under 2 pixels: merged, the failure's column red
    merged = [int(n) for n in re.findall(r"<title>(\d+) short test", svg)]
    assert sum(merged) == instances * per_instance
    assert len(merged) <= 2 * instances
    assert len(re.findall(r'fill="#cf222e"><title>\d+ short test', svg)) == instances
    assert len(svg) < 200_000


@pytest.mark.skipif(chromium() is None, reason="no chromium: run scripts/ensure-chromium")
def test_timeline_rendered_by_chromium_shows_a_row_per_instance_of_the_report(
    gpu_run: GpuRun,
) -> None:
    gpu_run.pytester.makepyfile(test_session=SESSION_TESTS)
    args = ["-p", "no:randomly", "--gpu-report", "r.json", "--gpu-timeline", "t.svg"]
    gpu_run(*args, "--gpu-start", "eager", "--gpu-max-instances", "1")
    root = gpu_run.pytester.path
    report = json.loads((root / "r.json").read_text())
    render_png(root / "t.svg", root / "t.png")
    image = Image.open(root / "t.png").convert("RGB")
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 10, "a blank picture"
    rows = len(report["instances"]) + 1
    expected = [
        {"#54aeff", "#2da44e", "#cf222e"},  # the instance: booting, a pass and the failure
        {"#2da44e", "#bf8700"},  # the local tests: two passes and a skip
    ]
    assert rows == len(expected)
    for index in range(rows + 1):
        y = round(timeline.row_top(index) + timeline.ROW_HEIGHT / 2)
        seen = {_colour(image, x, y) for x in range(timeline.LABEL_WIDTH, image.width)}
        wanted = expected[index] if index < rows else set()
        drawn = seen & {*timeline.OUTCOME_COLOURS.values(), timeline.PHASE_COLOURS["booting"]}
        assert drawn == wanted, f"row {index}"


def _colour(image: Image.Image, x: int, y: int) -> str:
    pixel = image.getpixel((x, y))
    assert isinstance(pixel, tuple)
    return "#" + "".join(f"{channel:02x}" for channel in pixel[:3])


def test_on_github_an_infrastructure_error_is_a_warning_naming_the_instance(
    gpu_run: GpuRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu_run.pytester.makepyfile(
        test_lost="""
        import pathlib
        import time

        import pytest

        @pytest.mark.gpu("T4")
        def test_preempted():
            (pathlib.Path.home() / "lose-me").touch()
            time.sleep(60)
        """
    )
    gpu_run.sim.fault(kind="preempt", on_file="lose-me")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = gpu_run("-p", "no:randomly", "--gpu-report", "r.json", "--gpu-retries", "0")
    result.assert_outcomes(errors=1)
    (instance,) = json.loads((gpu_run.pytester.path / "r.json").read_text())["instances"]
    commands = [line for line in result.outlines if line.startswith("::")]
    assert len(commands) == 1
    assert commands[0].startswith(
        f"::warning title=gpu-cloud infrastructure error (instance {instance['id']})"
        "::test_lost.py::test_preempted: gpu-cloud: "
    )
    assert f"the remote worker on instance {instance['id']} stopped" in commands[0]


def test_under_xdist_the_controller_writes_the_summary_of_every_worker(
    gpu_run: GpuRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    gpu_run.pytester.makepyfile(test_session=SESSION_TESTS)
    args = ["-p", "no:randomly", "-n", "2", "--gpu-start", "eager"]
    result = gpu_run.subprocess(*args, "--gpu-report", "r.json", "--gpu-timeline", "t.svg")
    result.assert_outcomes(passed=3, failed=1, skipped=1)
    report = json.loads((gpu_run.pytester.path / "r.json").read_text())
    text = step_summary.read_text()
    assert text.count("## gpu-cloud") == 1
    assert "**5 test(s):** 3 passed, 1 failed, 1 skipped" in text.splitlines()
    assert "| `test_session.py::test_remote_fails` (failed) |" in text
    svg = (gpu_run.pytester.path / "t.svg").read_text()
    rows = re.findall(r'<g data-row="([^"]+)"', svg)
    assert rows == [*(i["id"] for i in report["instances"]), timeline.LOCAL_ROW]
