"""What a session leaves for CI: the job summary (markdown), the timeline (SVG), the plan
as markdown, and GitHub annotations; registered beside the controller in the process that
owns the fleet."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpucloud.scheduling.rejections import rejected_offers
from pytest_gpucloud.session import summary, timeline
from pytest_gpucloud.session.annotations import annotation_lines, on_github
from pytest_gpucloud.session.outcomes import Outcomes
from pytest_gpucloud.session.plan_md import plan_markdown
from pytest_gpucloud.session.summary_md import job_summary

if TYPE_CHECKING:
    from pytest_gpucloud.session.controller import Controller

#: Where GitHub Actions collects a step's job summary (markdown, appended to).
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


class CiOutputs:
    """Gathers each test's outcome; writes the files at the end of the session."""

    def __init__(self, controller: Controller, environ: Mapping[str, str] = os.environ) -> None:
        self._controller = controller
        self._environ = environ
        self.outcomes = Outcomes(controller.config.rootpath)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.outcomes.add(report)

    @pytest.hookimpl(trylast=True)  # after the controller has deleted the instances
    def pytest_sessionfinish(self) -> None:
        settings = self._controller.settings
        outcome = self._controller.service.outcome()
        if outcome is None:
            return
        if settings.plan:
            if settings.plan_md is not None and outcome.plan is not None:
                chosen = {m.pool: m.offer for m in outcome.plan.machines}
                rejections = {
                    pool: rejected_offers(pool, outcome.catalog, settings.regions, offer)
                    for pool, offer in chosen.items()
                }
                text = plan_markdown(outcome.plan, rejections, budget=settings.budget)
                _write(self._path(settings.plan_md), text)
            return
        summary_path = settings.summary_md or self._environ.get(STEP_SUMMARY_ENV) or None
        if summary_path is None and settings.timeline is None:
            return
        report = summary.report(
            outcome.machines, outcome.placements, budget=settings.budget, plan=outcome.plan
        )
        records = list(self.outcomes.records.values())
        svg = timeline.render(timeline.rows(report, records), now=time.time())
        if settings.timeline is not None:
            _write(self._path(settings.timeline), svg)
        if summary_path is not None:
            with self._path(summary_path).open("a", encoding="utf-8") as file:
                file.write(job_summary(report, records, timeline_svg=svg))

    @pytest.hookimpl(trylast=True)  # after the controller's cost report
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        outcome = self._controller.service.outcome()
        if outcome is None or not on_github(self._environ):
            return
        records = self.outcomes.records.values()
        ids = [m.id for m in outcome.machines if m.instance is not None]
        lines = annotation_lines(records, ids, prefix=self._workspace_prefix())
        if lines:
            terminalreporter.ensure_newline()
        for line in lines:
            terminalreporter.write_line(line)

    def _path(self, given: str) -> Path:
        """Relative to the rootdir, as ``--gpu-report`` is."""
        return self._controller.config.rootpath / os.path.expanduser(given)

    def _workspace_prefix(self) -> str:
        """The rootdir relative to the repository (GitHub's annotations name files so)."""
        workspace = self._environ.get("GITHUB_WORKSPACE")
        rootdir = self._controller.config.rootpath
        if not workspace:
            return ""
        try:
            inside = rootdir.resolve().relative_to(Path(workspace).resolve()).as_posix()
        except ValueError:
            return ""
        return "" if inside == "." else inside + "/"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
