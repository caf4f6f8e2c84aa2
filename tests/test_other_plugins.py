"""The plugins beside this one, piece by piece: the options that travel and the coverage
paths (end to end: tests/test_e2e_plugins.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gpucloud.features.coverage import _mapped, remote_request
from pytest_gpucloud.session.other_plugins import forwarded_args

ASYNCIO_SCOPE = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def test_options_travel_as_this_session_has_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_TIMEOUT", "7")
    monkeypatch.setenv("PYTEST_ADDOPTS", "")  # randomly on, as installed
    pytester.makeini(ASYNCIO_SCOPE)
    config = pytester.parseconfigure(
        "-p",
        "no:gpucloud",
        "-p",
        "randomly",
        "--randomly-seed=42",
        "--randomly-dont-reset-seed",
        "--reruns=2",
        "--only-rerun=OSError",
        "--only-rerun=Timeout",
        "--hypothesis-seed=3",
        "--asyncio-mode=auto",
    )
    args = forwarded_args(config)
    assert args == [
        "--reruns=2",
        "--only-rerun=OSError",
        "--only-rerun=Timeout",
        "--randomly-seed=42",
        "--hypothesis-seed=3",
        "--asyncio-mode=auto",
        "--timeout=7",
        "--randomly-dont-reset-seed",
    ]


def test_a_plugin_off_here_is_off_there(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfigure("-p", "no:gpucloud", "-p", "no:rerunfailures")
    args = forwarded_args(config)
    assert not [a for a in args if "rerun" in a]
    # Blocked here by -p (which travels as it is), so not blocked a second time.
    assert "no:randomly" not in args


def test_randomly_missing_here_is_blocked_there(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_ADDOPTS", "")
    pytester.makeini(ASYNCIO_SCOPE)
    config = pytester.parseconfigure("-p", "no:gpucloud")
    config.pluginmanager.unregister(name="randomly")
    assert forwarded_args(config)[-2:] == ["-p", "no:randomly"]


def test_coverage_sources_are_workspace_folders_or_packages(pytester: pytest.Pytester) -> None:
    (pytester.path / "src" / "mypkg").mkdir(parents=True)
    (pytester.path / ".coveragerc").write_text("[run]\nbranch = false\n")
    config = pytester.parseconfigure(
        "-p", "no:gpucloud", "--cov=src", "--cov=json", "--cov-branch", "--cov-report="
    )
    try:
        assert remote_request(config) == {
            "source": ["src", "json"],
            "branch": True,
            "config_file": ".coveragerc",
        }
    finally:
        plugin = config.pluginmanager.get_plugin("_cov")
        assert plugin is not None
        plugin.cov_controller.cov.stop()


def test_no_coverage_request_without_cov(pytester: pytest.Pytester) -> None:
    assert remote_request(pytester.parseconfigure("-p", "no:gpucloud")) is None


def test_remote_coverage_paths_map_to_the_rootdir() -> None:
    measured = [
        "/home/u/gpucloud/proj/pkg/mod.py",
        "/home/u/gpucloud/proj/.gpucloud/pkg/gpucloud_remote/worker.py",
        "/home/u/gpucloud/project2/other.py",
        "/usr/lib/python3/json/__init__.py",
    ]
    mapped = _mapped(measured, "/home/u/gpucloud/proj", Path("/src/proj"))
    assert mapped == {"/home/u/gpucloud/proj/pkg/mod.py": "/src/proj/pkg/mod.py"}
