"""The plugin object registered when ``--gpu-cloud`` is on: it plans the gpu items, runs
each on the fleet, replays the results into this session, and tears everything down."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpucloud import cost
from pytest_gpucloud.artifacts import ArtifactStore, new_run_id
from pytest_gpucloud.durations import Durations
from pytest_gpucloud.engine import Engine
from pytest_gpucloud.errors import PREFIX, GpuCloudError
from pytest_gpucloud.fleet import Fleet
from pytest_gpucloud.interrupts import Interrupts
from pytest_gpucloud.ipc import Handoff, IpcClient, IpcServer
from pytest_gpucloud.replay import (
    TeardownStep,
    remote_pytest_args,
    replay_collectreport,
    replay_infra_error,
    replay_test,
    replay_warning,
)
from pytest_gpucloud.request import GpuRequest, parse_marker
from pytest_gpucloud.service import (
    FleetAccess,
    FleetService,
    InstanceView,
    LocalAccess,
    RunResult,
)
from pytest_gpucloud.session.local_teardown import teardown_locally, with_local_teardown
from pytest_gpucloud.settings import OPTIONS
from pytest_gpucloud.stash import PROVIDERS_KEY, REQUEST_KEY

if TYPE_CHECKING:
    from collections.abc import Generator

    from pytest_gpucloud.instance_handle import InstanceHandle
    from pytest_gpucloud.providers.base import Provider
    from pytest_gpucloud.settings import Settings

# The nodeid the remote session knows an item by: xdist's --dist loadgroup appends
# "@group" to the local one.
REMOTE_NODEID_KEY = pytest.StashKey[str]()
SHUTDOWN_TIMEOUT = 120.0
#: The variables by which pytest knows it runs on CI (see _pytest.assertion.util).
CI_MARKERS = ("CI", "BUILD_NUMBER")
SIMULATED_NOTE = (
    "the simulated GPU cloud: instances are processes on this machine and "
    '"GPU" tests run on its CPU'
)


class GpuCloudHandle:
    """What the ``gpu_cloud`` fixture gives a test: the fleet as it is now."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    @property
    def provider(self) -> str:
        return self._controller.provider_name

    @property
    def instances(self) -> list[InstanceView]:
        return self._controller.access.instances()

    @property
    def cost_so_far(self) -> float:
        return sum(view.cost for view in self.instances)

    def instance(
        self, spec: object = None, **options: object
    ) -> contextlib.AbstractContextManager[InstanceHandle]:
        """``with gpu_cloud.instance("A100") as gpu:`` an instance of this test's own, deleted
        after the block: ``gpu.run(cmd)``, ``put``, ``get``, ``call(fn, ...)``. ``spec`` and
        ``options`` as for the ``gpu`` marker (``count``, ``vram``, ``image``)."""
        return self._controller.lease_instance(parse_marker((spec,), options))


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
        self.provider: Provider | None = None
        self.fleet: Fleet | None = None
        self.service = FleetService(self._start_fleet)
        self.access: FleetAccess
        self.in_xdist_worker = handoff is not None
        if handoff is None:
            self.access = LocalAccess(self.engine, self.service)
        else:
            self.access = IpcClient(handoff, owner=config.workerinput["workerid"])  # type: ignore[attr-defined]
        self._server: IpcServer | None = None
        self._next: dict[str, str | None] = {}
        self._shut_down = False
        # Expected durations from earlier runs; the process that owns the fleet keeps them.
        self.durations = Durations.load(None if handoff else getattr(config, "cache", None))
        # nodeid -> the machine label its remote test ran on, for -v lines
        self._ran_on: dict[str, str] = {}
        self._session: pytest.Session | None = None
        self._session_ended = False
        self.infra_errors = 0
        # The process that owns the instances deletes them, whatever ends the session.
        self._interrupts = None if handoff else Interrupts(self._shutdown)
        if self._interrupts is not None:
            self._interrupts.install()

    def handle(self) -> GpuCloudHandle:
        return GpuCloudHandle(self)

    def lease_instance(
        self, request: GpuRequest
    ) -> contextlib.AbstractContextManager[InstanceHandle]:
        return self.access.lease(request)

    def handoff(self) -> Handoff:
        """What an xdist worker needs to reach this process's fleet; serves it from now on."""
        if self._server is None:
            self._server = IpcServer(self.service, self.provider_name)
            self.engine.run(self._server.start(), timeout=30)
        return self._server.handoff

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        line = f"gpu-cloud: provider {self.provider_name}"
        if self.provider_name == "sim":
            line += f" ({SIMULATED_NOTE})"
        return [line]

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
        if not planned or self.config.option.collectonly:
            return
        try:
            errors = self.access.plan(
                [(_remote_nodeid(i), i.stash.get(REQUEST_KEY, None)) for i in session.items]
            )
        except GpuCloudError as exc:
            if not self.in_xdist_worker:
                raise pytest.UsageError(str(exc)) from None
            # A worker cannot stop xdist's session: each gpu test reports it as its error.
            errors = {}
        runnable: list[tuple[pytest.Item, GpuRequest]] = []
        for item, request in planned:
            if _remote_nodeid(item) in errors:
                session.items.remove(item)
                report = pytest.CollectReport(
                    item.nodeid, "failed", errors[_remote_nodeid(item)], []
                )
                session.ihook.pytest_collectreport(report=report)
                continue
            runnable.append((item, request))
        self._plan(runnable)

    async def _start_fleet(self) -> Fleet:
        self.provider = await self.config.stash[PROVIDERS_KEY].make(
            self.provider_name, self.settings
        )
        artifacts = self._artifact_store()
        self.fleet = Fleet(
            self.provider,
            self.settings,
            rootdir=self.config.rootpath,
            start={**self._worker_start(), "artifacts": artifacts.remote_root},
            project=self.config.rootpath.name,
            durations=self.durations,
            workers=_xdist_workers(self.config),
            artifacts=artifacts,
        )
        return self.fleet

    def _artifact_store(self) -> ArtifactStore:
        run_id = new_run_id()
        settings = self.settings
        if settings.artifacts_dir is not None:
            given = os.path.expanduser(settings.artifacts_dir)
            root = self.config.invocation_params.dir / given
        else:
            root = self.config.rootpath / ".gpucloud" / "artifacts" / run_id
        return ArtifactStore(
            root,
            run_id,
            max_bytes=settings.artifacts_max,
            timeout=settings.timeout,
            s3_url=settings.artifacts_s3,
            s3_endpoint=settings.s3_endpoint,
        )

    def _worker_start(self) -> dict[str, Any]:
        return {
            "args": remote_pytest_args(self.config),
            "options": [{"name": o.flag, "takes_value": not o.is_switch} for o in OPTIONS],
            "ini": [o.ini for o in OPTIONS],
            # pytest shows full assertion diffs on CI; the remote session must too.
            "environ": {name: os.environ[name] for name in CI_MARKERS if name in os.environ},
        }

    def _plan(self, runnable: list[tuple[pytest.Item, GpuRequest]]) -> None:
        # A pool's consecutive tests share one remote session: each run names the next
        # test of the pool, so fixtures of wider scope stay up between them. An xdist
        # worker does not know its schedule: it names its own next item (see _nextid).
        if self.in_xdist_worker:
            return
        by_pool: dict[Any, list[pytest.Item]] = {}
        for item, request in runnable:
            by_pool.setdefault(request.pool_key, []).append(item)
        # With -x, --maxfail or --stepwise the session may stop at any test: none is sent
        # ahead of its turn.
        stops = self.config.option.maxfail or self.config.getoption("stepwise", False)
        read_ahead = self.fleet.read_ahead if self.fleet is not None and not stops else None
        for items in by_pool.values():
            remote_ids = [_remote_nodeid(item) for item in items]
            for item, following in zip(items, [*remote_ids[1:], None], strict=True):
                self._next[item.nodeid] = following
                if read_ahead is not None:
                    read_ahead[_remote_nodeid(item)] = (item.stash[REQUEST_KEY], following)

    def _nextid(self, item: pytest.Item, nextitem: pytest.Item | None) -> str | None:
        if not self.in_xdist_worker:
            return self._next.pop(item.nodeid, None)
        following = nextitem.stash.get(REQUEST_KEY, None) if nextitem else None
        if nextitem is None or following is None:
            return None
        same_pool = following.pool_key == item.stash[REQUEST_KEY].pool_key
        return _remote_nodeid(nextitem) if same_pool else None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        request = item.stash.get(REQUEST_KEY, None)
        if request is None:
            return None
        result = self.access.run(_remote_nodeid(item), request, self._nextid(item, nextitem))

        def teardown(remote: pytest.TestReport) -> pytest.TestReport:
            return with_local_teardown(remote, teardown_locally(item, nextitem))

        self._replay(item, result, teardown)
        return True

    def _replay(self, item: pytest.Item, result: RunResult, teardown: TeardownStep) -> None:
        if result.error is not None:
            replay_infra_error(item, result.error, result.properties, teardown)
            return
        self._ran_on[item.nodeid] = sys.intern(result.machine_label)  # one string a machine
        paths = {"remote_root": result.remote_root, "local_root": str(self.config.rootpath)}
        for report in result.collection_errors:
            replay_collectreport(item.session, report, **paths)
        for warning in result.collection_warnings:
            replay_warning(self.config, warning, **paths)
        for warning in _renamed(result.warnings, result.nodeid, item.nodeid):
            replay_warning(self.config, warning, **paths)
        if result.missing:
            replay_infra_error(
                item,
                f"gpu-cloud: {item.nodeid} was not collected on instance {result.machine_id}",
                teardown=teardown,
            )
        else:
            frames = _renamed(result.reports, result.nodeid, item.nodeid)
            replay_test(item, frames, **paths, properties=result.properties, teardown=teardown)

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
        if self.fleet is not None and session and (session.shouldstop or session.shouldfail):
            # -x, --maxfail: no queued test will run; their machines go now
            self.engine.loop.call_soon_threadsafe(self.fleet.forget)

    def _write_progress(self) -> None:
        """The fleet's status lines since the last call, on the main thread (not with -q)."""
        if self.fleet is None:
            return
        events = self.fleet.progress.drain()
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.get_verbosity() < 0:
            return
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
        if self.fleet is not None and not self.in_xdist_worker:
            self.durations.save(getattr(self.config, "cache", None))
            if self.settings.report is not None:
                report = cost.report(
                    self.fleet.machines,
                    self.fleet.placements,
                    budget=self.settings.budget,
                    plan=self.fleet.planned,
                )
                cost.write_report(self.config.rootpath / self.settings.report, report)
        if self.fleet is not None and self.fleet.orphans and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

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
        if report.failed and str(report.longrepr).startswith(PREFIX):
            self.infra_errors += 1

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.fleet is None:
            return
        terminalreporter.section("gpu-cloud")
        if self.provider_name == "sim":
            terminalreporter.write_line(f"provider sim: {SIMULATED_NOTE}")
        planned = self.fleet.planned
        if self.settings.plan and planned is not None:
            verbose = self.config.get_verbosity() > 0
            for line in planned.lines(verbose=verbose, budget=self.settings.budget):
                terminalreporter.write_line(line)
            terminalreporter.write_line("--gpu-plan: no instance was created and no test ran")
            return
        bills = cost.bills(self.fleet.machines)
        for line in cost.summary_lines(bills, self.settings.budget):
            terminalreporter.write_line(line)
        for line in self.fleet.data.summary_lines():
            terminalreporter.write_line(line)
        if self.fleet.artifacts is not None:
            stats = terminalreporter.stats
            failed = [r.nodeid for r in [*stats.get("failed", []), *stats.get("error", [])]]
            for line, warn in self.fleet.artifacts.summary_lines(failed):
                terminalreporter.write_line(line, yellow=warn)
        if self.infra_errors:
            terminalreporter.write_line(
                f"gpu-cloud: {self.infra_errors} infrastructure error(s): test(s) that could "
                "not run or finish on an instance (not test failures; see the ERRORs above)",
                yellow=True,
            )
        for machine in self.fleet.machines:
            if machine.error:
                terminalreporter.write_line(f"{machine.id}: {machine.error}", yellow=True)
        for note in self.fleet.notes:
            terminalreporter.write_line(note, yellow=True)
        if self.fleet.orphans:
            terminalreporter.write_line(
                "gpu-cloud: these instances could not be deleted and may still cost money: "
                + ", ".join(self.fleet.orphans)
                + " (delete them in your cloud console or with python -m pytest_gpucloud cleanup)",
                red=True,
            )

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
        if self.fleet is not None:
            if self._interrupts is not None and self._interrupts.signalled:
                self.fleet.launcher.hurry.set()  # CI kills 10 s after its first signal
            try:
                self.engine.run(self.fleet.shutdown(), timeout=SHUTDOWN_TIMEOUT)
            except TimeoutError:
                self.fleet.orphans.extend(
                    m.id for m in self.fleet.machines if m.state.value != "released"
                )
            if self.fleet.artifacts is not None:  # after the deletes: no instance waits
                try:
                    self.engine.run(self.fleet.artifacts.finish(), timeout=self.settings.timeout)
                except TimeoutError:
                    self.fleet.notes.append("gpu-cloud: artifact uploads to S3 did not finish")
        if self.provider is not None:
            with contextlib.suppress(TimeoutError):
                self.engine.run(self.provider.aclose(), timeout=30)

    def close(self) -> None:
        self._shutdown()
        self.engine.close()
        if self._interrupts is not None:
            self._interrupts.restore()


def _xdist_workers(config: pytest.Config) -> int:
    """How many xdist workers run tests at once (1 without xdist); --gpu-plan, which turns
    xdist off, plans for the workers asked for."""
    return max(1, int(getattr(config.option, "numprocesses", None) or 1))


def _remote_nodeid(item: pytest.Item) -> str:
    return item.stash.get(REMOTE_NODEID_KEY, item.nodeid)


def _renamed(frames: list[dict[str, Any]], remote: str, local: str) -> list[dict[str, Any]]:
    """Frames of the remote test ``remote`` as the local item ``local`` reports them."""
    if remote == local:
        return frames
    return [{**f, "nodeid": local} if f.get("nodeid") == remote else f for f in frames]
