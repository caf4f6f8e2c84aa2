"""The plugin object registered when ``--gpu-cloud`` is on: the session's pytest hooks.

It holds the roles' objects and wires them to pytest: the front desk (a
:class:`~pytest_gpucloud.desk.service.FleetAccess`: the fleet in this process, or the
controller's over IPC in an xdist worker), the fleet's making (:mod:`.startup`), the order of
gpu tests (:mod:`.order`), the replay of their results (:mod:`.results`), the signals
(:mod:`.interrupts`), the summary and report (:mod:`.summary`) and the teardown
(:meth:`Controller.close`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpucloud.core.engine import Engine
from pytest_gpucloud.core.errors import PREFIX, GpuCloudError, ServiceError
from pytest_gpucloud.desk.ipc import Handoff, IpcClient, IpcServer
from pytest_gpucloud.desk.service import FleetAccess, FleetService, LocalAccess
from pytest_gpucloud.features import coverage, gpu_service
from pytest_gpucloud.providers import vendors
from pytest_gpucloud.scheduling.durations import Durations
from pytest_gpucloud.session import summary
from pytest_gpucloud.session.handle import GpuCloudHandle
from pytest_gpucloud.session.interrupts import Interrupts
from pytest_gpucloud.session.local_teardown import teardown_locally, with_local_teardown
from pytest_gpucloud.session.order import REMOTE_NODEID_KEY, RunOrder, remote_nodeid
from pytest_gpucloud.session.other_plugins import RemoteSide
from pytest_gpucloud.session.outcomes import infrastructure_longrepr, is_infrastructure_error
from pytest_gpucloud.session.results import replay_result
from pytest_gpucloud.session.startup import FleetStarter
from pytest_gpucloud.session.stash import REQUEST_KEY
from pytest_gpucloud.transport.sync import left_behind

if TYPE_CHECKING:
    from collections.abc import Generator

    from pytest_gpucloud.config.settings import Settings
    from pytest_gpucloud.core.request import GpuRequest

SHUTDOWN_TIMEOUT = 120.0


class Controller:
    """Runs the gpu items of this process and, in the controlling process, owns the fleet.

    ``handoff``: in an xdist worker, the controller's fleet socket; the worker then reaches
    the fleet through it and never makes a provider or fleet of its own.
    """

    def __init__(
        self,
        config: pytest.Config,
        settings: Settings,
        provider_name: str,
        handoff: Handoff | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.provider_name = provider_name
        self.engine = Engine()
        self.in_xdist_worker = handoff is not None
        # Expected durations from earlier runs; the process that owns the fleet keeps them.
        self.durations = Durations.load(None if handoff else getattr(config, "cache", None))
        self.starter = FleetStarter(
            config, settings, provider_name, self.durations, _xdist_workers(config)
        )
        self.service = FleetService(self.starter)
        self.access: FleetAccess
        if handoff is None:
            self.access = LocalAccess(self.engine, self.service, self._write_progress)
        else:
            self.access = IpcClient(handoff, owner=config.workerinput["workerid"])  # type: ignore[attr-defined]
        self.order = RunOrder(self.in_xdist_worker)
        self._server: IpcServer | None = None
        self._shut_down = False
        # nodeid -> the machine label its remote test ran on, for -v lines
        self._ran_on: dict[str, str] = {}
        self._session: pytest.Session | None = None
        self._session_ended = False
        self.infra_errors = 0
        # The process that owns the instances deletes them, whatever ends the session.
        self._interrupts = None if handoff else Interrupts(self._shutdown)
        if self._interrupts is not None:
            self._interrupts.install()
        self._other_plugins = RemoteSide(config, self.remote_coverage)
        config.pluginmanager.register(self._other_plugins, "gpucloud-other-plugins")

    def handle(self) -> GpuCloudHandle:
        return GpuCloudHandle(self.provider_name, self.access)

    def service_factory(self) -> gpu_service.ServiceFactory:
        return gpu_service.ServiceFactory(self.access, owns_servers=not self.in_xdist_worker)

    def handoff(self) -> Handoff:
        """What an xdist worker needs to reach this process's fleet; serves it from now on."""
        if self._server is None:
            self._server = IpcServer(self.service, self.provider_name)
            self.engine.run(self._server.start(), timeout=30)
        return self._server.handoff

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        line = f"gpu-cloud: provider {self.provider_name}"
        if self.provider_name == "sim":
            line += f" ({summary.SIMULATED_NOTE})"
        note = vendors.header_note(self.provider_name, self.settings)
        return [line] if note is None else [line, f"gpu-cloud: {note}"]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Before xdist's loadgroup renames items.
        for item in items:
            item.stash[REMOTE_NODEID_KEY] = item.nodeid

    @pytest.hookimpl(tryfirst=True)  # before xdist's worker sends the items it has
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        planned = [
            (item, item.stash[REQUEST_KEY]) for item in session.items if REQUEST_KEY in item.stash
        ]
        services = gpu_service.declared(session.items)
        if not (planned or services) or self.config.option.collectonly:
            return
        try:
            errors = self.access.plan(
                [(remote_nodeid(i), i.stash.get(REQUEST_KEY, None)) for i in session.items],
                services,
            )
        except GpuCloudError as exc:
            if not self.in_xdist_worker:
                raise pytest.UsageError(str(exc)) from None
            # A worker cannot stop xdist's session: each gpu test reports it as its error.
            errors = {}
        runnable: list[tuple[pytest.Item, GpuRequest]] = []
        for item, request in planned:
            if remote_nodeid(item) in errors:
                session.items.remove(item)
                report = pytest.CollectReport(
                    item.nodeid, "failed", errors[remote_nodeid(item)], []
                )
                session.ihook.pytest_collectreport(report=report)
                continue
            runnable.append((item, request))
        # With -x, --maxfail or --stepwise the session may stop at any test: none is sent
        # ahead of its turn.
        stops = self.config.option.maxfail or self.config.getoption("stepwise", False)
        order = self.order.plan(runnable, read_ahead=not stops)
        if order:
            self.engine.run(self.service.expect(order))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        request = item.stash.get(REQUEST_KEY, None)
        if request is None:
            return None
        # Announced when sent, as pytest does for a local test: -v shows what runs now.
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        result = self.access.run(remote_nodeid(item), request, self.order.nextid(item, nextitem))
        if result.error is None:
            self._ran_on[item.nodeid] = sys.intern(result.machine_label)  # one string a machine

        def teardown(remote: pytest.TestReport) -> pytest.TestReport:
            return with_local_teardown(remote, teardown_locally(item, nextitem))

        replay_result(item, result, self.config.rootpath, teardown)
        return True

    def remote_coverage(self) -> list[tuple[str, str]]:
        """With ``--cov``: every machine released now, before pytest-cov combines its data;
        then each worker's ``(remote workspace, coverage data)``."""
        if not self.service.started or coverage.remote_request(self.config) is None:
            return []
        self._shutdown()
        outcome = self.service.outcome()
        machines = outcome.machines if outcome is not None else []
        for machine in machines:
            if machine.tests_run and machine.coverage is None:
                self.service.note(
                    f"{PREFIX}no coverage data came back from {machine.label}: its worker "
                    "did not end its session (its lines count as not run)"
                )
        return [(m.remote_root, m.coverage) for m in machines if m.coverage]

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        """--gpu-plan: the plan is made; no test runs, local or remote."""
        return True if self.settings.plan else None

    @pytest.hookimpl(trylast=True)  # after the terminal has finished the test's line
    def pytest_runtest_logfinish(self) -> None:
        self._write_progress()
        session = self._session
        if not self.in_xdist_worker and session and (session.shouldstop or session.shouldfail):
            # -x, --maxfail: no queued test will run; their machines go now
            self.engine.loop.call_soon_threadsafe(self.service.forget)

    def _write_progress(self) -> None:
        """The fleet's status lines since the last call, on the main thread (not with -q)."""
        events = self.service.progress()
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.get_verbosity() < 0:
            return
        if events and reporter._tw.width_of_current_line:
            reporter.line("")  # after the "[100%]" of a progress line, not on it
        for event in events:
            reporter.write_line(event.line())

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(
        self, report: pytest.TestReport | pytest.CollectReport, config: pytest.Config
    ) -> Generator[None, Any, Any]:
        """In -v lines, a remote test's word names where it ran: ``PASSED [T4 i-3f2a]``
        (not in the summary at the end, which tools read)."""
        status = yield
        where = getattr(report, "gpu_instance", None)
        shown = status and status[2] and config.get_verbosity() > 0 and not self._session_ended
        if not where or not shown:
            return status
        category, letter, word = status
        if isinstance(word, tuple):
            return category, letter, (f"{word[0]} [{where}]", word[1])
        return category, letter, f"{word} [{where}]"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._session_ended = True
        self._shutdown()
        self._write_progress()
        outcome = self.service.outcome()
        if outcome is None:
            return
        self.durations.save(getattr(self.config, "cache", None))
        if self.settings.report is not None:
            report = summary.report(
                outcome.machines,
                outcome.placements,
                budget=self.settings.budget,
                plan=outcome.plan,
            )
            summary.write_report(self.config.rootpath / self.settings.report, report)
        if outcome.orphans and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """A ``gpu_service`` that could not start is a setup error reading ``gpu-cloud:
        ...`` (counted as infrastructure), not a traceback through the plugin."""
        report = yield
        failure = call.excinfo.value if call.excinfo is not None else None
        if call.when == "setup" and isinstance(failure, ServiceError):
            report.longrepr = infrastructure_longrepr(item, str(failure))
        return report

    @pytest.hookimpl(tryfirst=True)  # before the terminal's (and xdist's) use of it
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        ran_on = self._ran_on.get(report.nodeid)
        if report.when == "teardown":
            self._ran_on.pop(report.nodeid, None)
        if ran_on:
            report.gpu_instance = ran_on  # type: ignore[attr-defined]  # travels with xdist
        if not self.in_xdist_worker:
            self.durations.add_phase(report.nodeid, report.duration)
        # Here, not where errors are replayed: xdist's controller sees its workers' too.
        if is_infrastructure_error(report):
            self.infra_errors += 1

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        outcome = self.service.outcome()
        if outcome is None:
            return
        terminalreporter.section("gpu-cloud")
        stats = terminalreporter.stats
        failed = [r.nodeid for r in [*stats.get("failed", []), *stats.get("error", [])]]
        for line, markup in summary.terminal_lines(
            outcome,
            settings=self.settings,
            simulated=self.provider_name == "sim",
            verbose=self.config.get_verbosity() > 0,
            failed=failed,
            infra_errors=self.infra_errors,
            stayed=left_behind(self.config.rootpath) if outcome.machines else [],
        ):
            terminalreporter.write_line(line, **markup)

    def _shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        if self._interrupts is not None:
            self._interrupts.ending = True
        self.access.close()
        if self._server is not None:
            # Runs still in flight belong to xdist workers that are gone.
            with contextlib.suppress(TimeoutError):
                self.engine.run(self._server.close(), timeout=30)
        if self.service.started:
            # CI kills 10 s after its first signal: no goodbyes then.
            hurry = self._interrupts is not None and bool(self._interrupts.signalled)
            try:
                self.engine.run(self.service.shutdown(hurry=hurry), timeout=SHUTDOWN_TIMEOUT)
            except TimeoutError:
                self.service.give_up()
            try:  # after the deletes: no instance waits
                self.engine.run(self.service.finish_uploads(), timeout=self.settings.timeout)
            except TimeoutError:
                self.service.note("gpu-cloud: artifact uploads to S3 did not finish")
        provider = self.starter.provider
        if provider is not None:
            with contextlib.suppress(TimeoutError):
                self.engine.run(provider.aclose(), timeout=30)

    def close(self) -> None:
        self.config.pluginmanager.unregister(self._other_plugins)
        self._shutdown()
        self.engine.close()
        if self._interrupts is not None:
            self._interrupts.restore()


def _xdist_workers(config: pytest.Config) -> int:
    """How many xdist workers run tests at once (1 without xdist); --gpu-plan, which turns
    xdist off, plans for the workers asked for."""
    return max(1, int(getattr(config.option, "numprocesses", None) or 1))
