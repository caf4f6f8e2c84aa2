"""A gpu test's :class:`~pytest_gpucloud.desk.service.RunResult` replayed into its item."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_gpucloud.session.replay import (
    TeardownStep,
    replay_collectreport,
    replay_infra_error,
    replay_test,
    replay_warning,
)

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from pytest_gpucloud.desk.service import RunResult


def replay_result(
    item: pytest.Item, result: RunResult, local_root: Path, teardown: TeardownStep
) -> None:
    """Its collection errors and warnings, then the test's own reports, under the local
    item's nodeid; an infrastructure error becomes the test's setup error (a time limit
    passed after setup, the error of the phase it was in). The test's
    ``pytest_runtest_logstart`` was called when it was sent. ``teardown``: the local side's,
    run where the test's teardown report is due."""
    paths = {"remote_root": result.remote_root, "local_root": str(local_root)}
    if result.error is not None and result.reports:  # a time limit passed in a later phase
        frames = _renamed(result.reports, result.nodeid, item.nodeid)
        replay_test(
            item,
            frames,
            **paths,
            lost=result.error,
            properties=result.properties,
            teardown=teardown,
            started=True,
        )
        return
    if result.error is not None:
        replay_infra_error(item, result.error, result.properties, teardown=teardown, started=True)
        return
    for report in result.collection_errors:
        replay_collectreport(item.session, report, **paths)
    for warning in result.collection_warnings:
        replay_warning(item.config, warning, **paths)
    for warning in _renamed(result.warnings, result.nodeid, item.nodeid):
        replay_warning(item.config, warning, **paths)
    if result.missing:
        replay_infra_error(
            item,
            f"gpu-cloud: {item.nodeid} was not collected on instance {result.machine_id}",
            teardown=teardown,
            started=True,
        )
    else:
        frames = _renamed(result.reports, result.nodeid, item.nodeid)
        replay_test(
            item,
            frames,
            **paths,
            properties=result.properties,
            teardown=teardown,
            started=True,
        )


def _renamed(frames: list[dict[str, Any]], remote: str, local: str) -> list[dict[str, Any]]:
    """Frames of the remote test ``remote`` as the local item ``local`` reports them."""
    if remote == local:
        return frames
    return [{**f, "nodeid": local} if f.get("nodeid") == remote else f for f in frames]
