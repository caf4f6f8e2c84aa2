"""pytest-cov beside this plugin: lines run by remote tests count in the local report.

As pytest-cov does for xdist workers on other hosts: each instance's worker measures its
session with the local ``--cov`` settings (``remote/measure.py``) and sends the data home
when it ends. Here that data, its paths moved from the remote workspace to the rootdir, is
written beside the local data file as one more parallel data file, which pytest-cov's own
combine takes in before it reports and checks ``--cov-fail-under``.

``coverage`` travels to the instance with the worker (this machine's copy, pure Python
there when the compiled tracer does not fit the instance's Python), and only with ``--cov``.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

# The worker's package folder in the workspace; its files are never the project's.
PACKAGE_DIR = ".gpucloud/pkg"


def _controller(config: pytest.Config) -> Any:
    """pytest-cov's controller in this process, when it measures."""
    plugin = config.pluginmanager.get_plugin("_cov")
    if plugin is None or getattr(plugin, "_disabled", True):
        return None
    return getattr(plugin, "cov_controller", None)


def remote_request(config: pytest.Config) -> dict[str, Any] | None:
    """The worker's ``coverage`` start entry for this session's ``--cov``, or None."""
    controller = _controller(config)
    if controller is None:
        return None
    topdir, rootdir = Path(controller.topdir), config.rootpath
    source = controller.cov_source
    config_file = controller.cov_config
    if config_file not in (True, False):
        config_file = _in_workspace(topdir / config_file, rootdir) or config_file
    return {
        "source": None if source is None else [_source(s, topdir, rootdir) for s in source],
        "branch": bool(controller.cov_branch),
        "config_file": config_file,
    }


def _source(entry: str, topdir: Path, rootdir: Path) -> str:
    """A folder of the project as the same folder in the workspace; else a package name."""
    path = topdir / entry
    return (_in_workspace(path, rootdir) or entry) if path.is_dir() else entry


def _in_workspace(path: Path, rootdir: Path) -> str | None:
    try:
        return path.resolve().relative_to(rootdir.resolve()).as_posix() or "."
    except ValueError:
        return None


def package_files() -> dict[str, Path]:
    """This machine's ``coverage`` package, as files of the worker's package folder."""
    import coverage

    source = Path(coverage.__file__).parent
    return {
        f"{PACKAGE_DIR}/coverage/{path.name}": path
        for path in sorted(source.iterdir())
        if path.suffix in (".py", ".so")
    }


def merge(config: pytest.Config, results: Iterable[tuple[str, str]]) -> int:
    """Write each instance's data (``(remote workspace, data)``) as a parallel data file of
    pytest-cov's, its files mapped to the rootdir; the number written."""
    controller = _controller(config)
    if controller is None:
        return 0
    from coverage import CoverageData

    data_file = os.path.join(controller.topdir, controller.cov.config.data_file)
    written = 0
    for remote_root, blob in results:
        remote = CoverageData(no_disk=True)
        remote.loads(base64.b64decode(blob))
        files = _mapped(remote.measured_files(), remote_root, config.rootpath.resolve())
        if not files:
            continue
        local = CoverageData(basename=data_file, suffix=f"gpucloud.{uuid.uuid4().hex[:12]}")
        if remote.has_arcs():
            local.add_arcs({files[f]: remote.arcs(f) or [] for f in files})
        else:
            local.add_lines({files[f]: remote.lines(f) or [] for f in files})
        local.write()
        written += 1
    return written


def _mapped(measured: Iterable[str], remote_root: str, rootdir: Path) -> dict[str, str]:
    """Remote file -> local file, for the project's files (not the worker's own)."""
    prefix = remote_root.rstrip("/") + "/"
    return {
        name: str(rootdir / name[len(prefix) :])
        for name in measured
        if name.startswith(prefix) and not name[len(prefix) :].startswith(PACKAGE_DIR + "/")
    }
