"""The plugins people run beside this one, and what each needs for remote tests.

Most need nothing: the remote session loads the same plugins (they must be installed on
the instance, as locally) and reads the same ini file, and their reports replay here. What
this module adds:

- the command-line options that change what a remote test does travel with it
  (:func:`forwarded_args`): reruns, the timeout, the random seed, Hypothesis' profile and
  seed, the asyncio mode;
- pytest-timeout's alarm fires on the instance, inside the test, not here while this
  process waits for the result (:class:`RemoteSide`);
- pytest-cov: the instance measures, and its data joins the local report before pytest-cov
  combines and checks it (:mod:`pytest_gpucloud.features.coverage`);
- ``--pdb`` and ``--trace`` cannot reach a test on an instance: one line says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import pytest

from pytest_gpucloud.core.errors import PREFIX
from pytest_gpucloud.features import coverage
from pytest_gpucloud.session.stash import REQUEST_KEY

# Per plugin (its registered name): (option dest, flag) of the options that change what a
# test does where it runs. Options read only at the end of the session stay here.
FORWARDED: dict[str, tuple[tuple[str, str], ...]] = {
    "rerunfailures": (
        ("reruns", "--reruns"),
        ("reruns_delay", "--reruns-delay"),
        ("reruns_delay_backoff_factor", "--reruns-delay-backoff-factor"),
        ("reruns_mode", "--reruns-mode"),
        ("force_reruns", "--force-reruns"),
        ("only_rerun", "--only-rerun"),
        ("rerun_except", "--rerun-except"),
        ("rerun_exclude_path", "--rerun-exclude-path"),
        ("max_suite_reruns", "--max-suite-reruns"),
    ),
    "timeout": (
        ("timeout_method", "--timeout-method"),
        ("timeout_disable_debugger_detection", "--timeout-disable-debugger-detection"),
    ),
    "randomly": (("randomly_seed", "--randomly-seed"),),
    "hypothesispytest": (
        ("hypothesis_profile", "--hypothesis-profile"),
        ("hypothesis_verbosity", "--hypothesis-verbosity"),
        ("hypothesis_seed", "--hypothesis-seed"),
        ("hypothesis_explain", "--hypothesis-explain"),
        ("hypothesis_show_statistics", "--hypothesis-show-statistics"),
    ),
    "asyncio": (("asyncio_mode", "--asyncio-mode"), ("asyncio_debug", "--asyncio-debug")),
}
PACKAGES = {
    "rerunfailures": "pytest-rerunfailures",
    "timeout": "pytest-timeout",
    "randomly": "pytest-randomly",
    "hypothesispytest": "hypothesis",
    "asyncio": "pytest-asyncio",
}
# Forwarded beside those of FORWARDED, from other values.
EXTRA_FLAGS = {"--timeout": "timeout", "--randomly-dont-reset-seed": "randomly"}
# Defaults that are not None: not sent, so an older release on the instance need not know them.
DEFAULTS = {"reruns_mode": "strict"}


def forwarded_args(config: pytest.Config) -> list[str]:
    """The remote session's arguments for the plugins beside this one, as this session has
    them: ``--randomly-seed`` is the seed this session drew, ``--timeout`` also comes from
    ``PYTEST_TIMEOUT`` (the instance's environment has not got it)."""
    option, plugins = config.option, config.pluginmanager
    args: list[str] = []
    for plugin, options in FORWARDED.items():
        if not plugins.hasplugin(plugin):
            continue
        for dest, flag in options:
            value = getattr(option, dest, None)
            if value != DEFAULTS.get(dest):
                args += _flag(flag, value)
    if plugins.hasplugin("timeout"):
        args += _flag("--timeout", option.timeout or os.environ.get("PYTEST_TIMEOUT"))
    if plugins.hasplugin("randomly"):
        if option.randomly_reset_seed is False:
            args.append("--randomly-dont-reset-seed")
    elif "no:randomly" not in (option.plugins or []):
        # Not here, then not there: it would reseed random in remote tests only.
        args += ["-p", "no:randomly"]
    return args


def option_packages() -> dict[str, str]:
    """Each forwarded option's package, for the instance to name one it lacks."""
    plugins = {flag: plugin for plugin, options in FORWARDED.items() for _, flag in options}
    return {flag: PACKAGES[plugin] for flag, plugin in {**plugins, **EXTRA_FLAGS}.items()}


def _flag(flag: str, value: object) -> list[str]:
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, list):
        return [f"{flag}={item}" for item in value]
    return [f"{flag}={value}"]


class RemoteSide:
    """Registered beside the controller: the other plugins' hooks for remote tests.

    ``remote_coverage``: with ``--cov``, ends the remote sessions and gives each one's
    ``(remote workspace, coverage data)``.
    """

    def __init__(
        self, config: pytest.Config, remote_coverage: Callable[[], list[tuple[str, str]]]
    ) -> None:
        self._config = config
        self._remote_coverage = remote_coverage

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item) -> bool | None:
        """pytest-timeout: a remote test's alarm is set on the instance, not here."""
        return True if REQUEST_KEY in item.stash else None

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        return True if REQUEST_KEY in item.stash else None

    @pytest.hookimpl(wrapper=True, trylast=True)  # inside pytest-cov's, which then combines
    def pytest_runtestloop(self) -> Generator[None, object, object]:
        result = yield
        coverage.merge(self._config, self._remote_coverage())
        return result

    @pytest.hookimpl(trylast=True)  # after the test's letter
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        config = self._config
        if not getattr(report, "gpu_instance", None):
            return
        if config.option.trace and report.when == "call":
            debugger = "--trace"
        elif config.option.usepdb and report.failed:
            debugger = "--pdb"
        else:
            return
        reporter: Any = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            if config.get_terminal_writer().width_of_current_line:  # after the test's letter
                reporter.write("\n")
            reporter.write_line(
                f"{PREFIX}{debugger} cannot stop in {report.nodeid}: it ran on "
                f"{report.gpu_instance}; run it without --gpu-cloud to debug it",
                yellow=True,
            )
