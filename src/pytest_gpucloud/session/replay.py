"""Remote reports -> local hooks.

A remote test is replayed on the local ``item.ihook`` exactly as pytest's runner would
have reported it (logstart, one logreport per phase, logfinish), from the reports the
remote worker serialized; nothing is re-made locally and nodeids are never changed.
Paths of the remote workspace are rewritten to the local rootdir on the way in.
"""

from __future__ import annotations

import builtins
import functools
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any, Literal

import pytest

from pytest_gpucloud.core.errors import PREFIX
from pytest_gpucloud.remote.protocol import Message
from pytest_gpucloud.session.outcomes import infrastructure_longrepr

# Plugins the remote session must not be asked for: this plugin itself, and the two the
# worker keeps inert there (the local session alone writes the cache and the junitxml).
LOCAL_ONLY_PLUGINS = frozenset({"gpucloud", "pytest_gpucloud.plugin", "cacheprovider", "junitxml"})
#: A remote test's teardown on the local side: given the teardown report that came, the one
#: to log.
TeardownStep = Callable[[pytest.TestReport], pytest.TestReport]


def remote_pytest_args(config: pytest.Config) -> list[str]:
    """Arguments for the remote session that make it see what this session sees.

    Relative to the remote workspace, which mirrors the local rootdir: the same rootdir and
    ini file, the ``-p`` plugins, and the command-line options that change outcomes or
    reports. The files to collect are added by the caller.
    """
    option = config.option
    args = ["--rootdir=.", "-c", _remote_inifile(config)]
    for name in option.plugins or []:
        if name.removeprefix("no:") not in LOCAL_ONLY_PLUGINS:
            args += ["-p", name]
    args += [
        f"--import-mode={option.importmode}",
        f"--capture={option.capture}",
        f"--tb={option.tbstyle}",
    ]
    if option.showlocals:
        args.append("--showlocals")
    if option.runxfail:
        args.append("--runxfail")
    for spec in option.pythonwarnings or []:
        args += ["-W", spec]
    # -v/-q may also come from the ini's addopts, which the remote session reads again:
    # pass the resolved assertion verbosity rather than counting flags twice.
    assertions = config.get_verbosity(pytest.Config.VERBOSITY_ASSERTIONS)
    args += ["-o", f"verbosity_assertions={assertions}"]
    for override in option.override_ini or []:
        args += ["-o", override]
    return args


def _remote_inifile(config: pytest.Config) -> str:
    # No ini file here: none there either, whatever lies above the remote workspace.
    if config.inipath is None or str(config.inipath) == os.devnull:
        return os.devnull
    try:
        return config.inipath.relative_to(config.rootpath).as_posix()
    except ValueError:
        raise pytest.UsageError(
            f"{PREFIX}the ini file {config.inipath} is outside the rootdir {config.rootpath},"
            " so it does not travel to GPU instances; move it under the rootdir"
        ) from None


class _PathMap:
    """Rewrites the remote workspace path to the local rootdir in serialized data."""

    def __init__(self, remote_root: str, local_root: str) -> None:
        self.remote = remote_root.rstrip("/") or remote_root
        self.local = local_root.rstrip("/") or local_root
        # Not a longer name that merely starts alike (/ws/proj vs /ws/proj2).
        self._pattern = re.compile(re.escape(self.remote) + r"(?![\w.-])")
        self._names = PurePath(self.remote).name, PurePath(self.local).name

    def localize(self, value: Any) -> Any:
        if isinstance(value, str):
            if not self.remote or self.remote == self.local or self.remote not in value:
                return value
            return self._pattern.sub(lambda _: self.local, value)
        if isinstance(value, dict):
            return {key: self.localize(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.localize(item) for item in value]
        return value

    def report_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """A serialized report, localized and with the tuples that JSON made lists."""
        data = self.localize(data)
        if isinstance(data.get("location"), list):
            data["location"] = tuple(data["location"])
        # A skip's (path, lineno, reason): junitxml and the terminal insist on a tuple.
        if data.get("outcome") == "skipped" and isinstance(data.get("longrepr"), list):
            data["longrepr"] = tuple(data["longrepr"])
        for key in ("sections", "user_properties"):
            if isinstance(data.get(key), list):
                data[key] = [tuple(entry) for entry in data[key]]
        # The rootdir's own collector node is named after its folder and lends its name to
        # every test's keywords.
        keywords = data.get("keywords")
        remote_name, local_name = self._names
        if isinstance(keywords, dict) and remote_name != local_name and remote_name in keywords:
            keywords[local_name] = keywords.pop(remote_name)
        return data


@functools.lru_cache(maxsize=16)
def _path_map(remote_root: str, local_root: str) -> _PathMap:
    # One per machine, not per test: the profile of 20,000 remote tests showed the regex
    # compile and the PurePath names of a new map per test.
    return _PathMap(remote_root, local_root)


def _unwrap(frame: Message, kind: str) -> dict[str, Any]:
    """The serialized report of a ``kind`` frame, or ``frame`` itself if it is one."""
    if frame.get("type") == kind:
        report: dict[str, Any] = frame["report"]
        return report
    return frame


def _load_report(
    config: pytest.Config,
    data: dict[str, Any],
    paths: _PathMap,
    shared: _Shared | None = None,
) -> pytest.TestReport | pytest.CollectReport:
    data = paths.report_data(data)
    if shared is not None:
        shared.apply(data)
    report: pytest.TestReport | pytest.CollectReport | None
    report = config.hook.pytest_report_from_serializable(config=config, data=data)
    if report is None:
        raise ValueError(f"not a serialized pytest report: {sorted(data)[:10]}")
    # The dispatch key became an attribute; the same report made here has none.
    report.__dict__.pop("$report_type", None)
    return report


class _Shared:
    """Makes a test's reports share strings and dicts with its item and with each other.

    pytest keeps every report to the end of the session (the terminal's stats): three per
    test, each freshly decoded from JSON. With the item's own nodeid and location, interned
    outcome and keyword names, and one keywords dict for the test's reports, 20,000 remote
    tests cost the local process about what 20,000 local ones do (bench/results.md).
    """

    def __init__(self, item: pytest.Item) -> None:
        self._item = item
        self._keywords: dict[str, Any] | None = None

    def adopt(self, report: pytest.TestReport) -> None:
        """Give the report its item's parsed nodeid (pytest >= 9 keeps one per node and
        parses a string into a new one for each report)."""
        parsed = getattr(self._item, "_id", None)
        if isinstance(parsed, str) or not hasattr(report, "_id"):
            return
        if parsed is not None and report.nodeid == self._item.nodeid:
            report._id = parsed

    def apply(self, data: dict[str, Any]) -> None:
        item = self._item
        if data.get("nodeid") == item.nodeid:
            data["nodeid"] = item.nodeid
        if data.get("location") == item.location:
            data["location"] = item.location
        for key in ("outcome", "when"):
            if isinstance(data.get(key), str):
                data[key] = sys.intern(data[key])
        keywords = data.get("keywords")
        if isinstance(keywords, dict):
            if keywords != self._keywords:
                self._keywords = {sys.intern(k): v for k, v in keywords.items()}
            data["keywords"] = self._keywords


def _local_report(
    item: pytest.Item,
    when: Literal["setup", "call", "teardown"],
    failure: str | None,
) -> pytest.TestReport:
    """A phase the plugin reports itself: passed, or failed with ``failure``'s text."""
    keywords: dict[str, Literal[1]] = dict.fromkeys(item.keywords, 1)
    outcome: Literal["passed", "failed"] = "passed" if failure is None else "failed"
    longrepr = None if failure is None else infrastructure_longrepr(item, _prefixed(failure))
    return pytest.TestReport(item.nodeid, item.location, keywords, outcome, longrepr, when)


def _prefixed(message: str) -> str:
    return message if message.startswith(PREFIX) else PREFIX + message


def _replay(
    item: pytest.Item,
    reports: list[pytest.TestReport],
    lost: str | None,
    properties: Sequence[Sequence[str]] = (),
    teardown: TeardownStep | None = None,
    started: bool = False,
) -> None:
    ihook = item.ihook

    def log(report: pytest.TestReport) -> None:
        if report.when == "teardown" and teardown is not None:
            report = teardown(report)
        report.user_properties.extend((name, value) for name, value in properties)
        ihook.pytest_runtest_logreport(report=report)

    if not started:
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    outcomes: dict[str, str] = {}
    attempts = 1
    for report in reports:
        if report.when == "setup" and outcomes:
            # Run again (pytest-rerunfailures): each attempt logged apart, as it does.
            ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
            outcomes, attempts = {}, attempts + 1
        outcomes.setdefault(report.when or "", report.outcome)
        log(report)
    if attempts > 1:
        item.execution_count = attempts  # type: ignore[attr-defined]  # its --fail-on-flaky
    if lost is not None and "teardown" not in outcomes:
        # Where pytest itself would have gone on: setup, else call (setup passed), else teardown.
        if "setup" not in outcomes:
            when: Literal["setup", "call", "teardown"] = "setup"
        elif outcomes["setup"] == "passed" and "call" not in outcomes:
            when = "call"
        else:
            when = "teardown"
        log(_local_report(item, when, lost))
        outcomes[when] = "failed"
    if "teardown" not in outcomes:
        log(_local_report(item, "teardown", None))
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    # What pytest's runner does after a test (runtestprotocol): the item's fixture request
    # is not needed again, and 20,000 items would each keep theirs.
    if hasattr(item, "_request"):
        item._request = False
        item.funcargs = None  # type: ignore[attr-defined]


def replay_test(
    item: pytest.Item,
    frames: list[Message],
    *,
    remote_root: str,
    local_root: str,
    lost: str | None = None,
    properties: Sequence[Sequence[str]] = (),
    teardown: TeardownStep | None = None,
    started: bool = False,
) -> None:
    """Replay one remote test on ``item.ihook``.

    ``frames``: the test's ``report`` and ``warning`` frames in arrival order (a bare
    serialized report is taken as a ``report`` frame). There is always a teardown report:
    a passed one is made up if none came. ``lost``: the worker died before the test's
    ``done``; the message is reported as a failure of the phase that did not finish.
    Warnings are recorded after the test, as pytest does. ``properties``: ``(name, value)``
    pairs added to each report's ``user_properties`` (junitxml shows them). ``teardown``:
    the local side's teardown, run when the teardown report is due; it gives the report
    that is logged. ``started``: ``pytest_runtest_logstart`` was called already, when the
    test was sent.
    """
    paths = _path_map(remote_root, local_root)
    shared = _Shared(item)
    reports: list[pytest.TestReport] = []
    warning_frames: list[Message] = []
    for frame in frames:
        if frame.get("type") == "warning":
            warning_frames.append(frame)
            continue
        report = _load_report(item.config, _unwrap(frame, "report"), paths, shared)
        if not isinstance(report, pytest.TestReport):
            raise ValueError(f"{item.nodeid}: expected a test report, got {type(report)}")
        shared.adopt(report)
        reports.append(report)
    _replay(item, reports, lost, properties, teardown, started)
    for frame in warning_frames:
        _record_warning(item.config, frame, paths)


def replay_infra_error(
    item: pytest.Item,
    message: str,
    properties: Sequence[Sequence[str]] = (),
    *,
    teardown: TeardownStep | None = None,
    started: bool = False,
) -> None:
    """Report ``item`` as an ERROR in setup: it could not run for an infrastructure reason.

    ``message`` is the whole report (prefixed ``gpu-cloud: `` if it is not already); never
    a failure of the test itself, never a skip. ``properties``, ``teardown``, ``started``:
    as for :func:`replay_test`.
    """
    _replay(item, [], message, properties, teardown, started)


def replay_collectreport(
    session: pytest.Session, frame: Message, *, remote_root: str, local_root: str
) -> None:
    """Report a remote collection error (a ``collectreport`` frame or its report)."""
    paths = _path_map(remote_root, local_root)
    report = _load_report(session.config, _unwrap(frame, "collectreport"), paths)
    session.ihook.pytest_collectreport(report=report)


def replay_warning(
    config: pytest.Config, frame: Message, *, remote_root: str, local_root: str
) -> None:
    """Record a remote ``warning`` frame through ``pytest_warning_recorded``."""
    _record_warning(config, frame, _path_map(remote_root, local_root))


def _record_warning(config: pytest.Config, frame: Message, paths: _PathMap) -> None:
    category = _warning_category(frame["category"], frame.get("category_module"))
    text: str = paths.localize(frame["message"])
    message: Warning | str
    try:
        message = category(text)
    except Exception:  # a custom warning class with its own constructor
        message = text
    record = warnings.WarningMessage(
        message, category, paths.localize(frame["filename"]), frame["lineno"]
    )
    location = frame.get("location")
    # pytest_warning_recorded is a historic hook: it cannot be called directly.
    config.hook.pytest_warning_recorded.call_historic(
        kwargs={
            "warning_message": record,
            "when": frame["when"],
            "nodeid": frame["nodeid"],
            "location": tuple(paths.localize(location)) if location else None,
        }
    )


def _warning_category(name: str, module: str | None) -> type[Warning]:
    """The local class of that name: the module's if already imported here, else a builtin
    or pytest's own; UserWarning if none (the message keeps the text)."""
    for namespace in (sys.modules.get(module or ""), builtins, pytest):
        candidate = getattr(namespace, name, None)
        if isinstance(candidate, type) and issubclass(candidate, Warning):
            return candidate
    return UserWarning
