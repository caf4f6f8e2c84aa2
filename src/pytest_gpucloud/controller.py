"""The plugin object registered when ``--gpu-cloud`` is on: it plans the gpu items, runs
each on the fleet, replays the results into this session, and tears everything down."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpucloud import cost
from pytest_gpucloud.catalog import check_known
from pytest_gpucloud.engine import Engine
from pytest_gpucloud.errors import PREFIX, GpuCloudError, MarkerError
from pytest_gpucloud.fleet import Fleet
from pytest_gpucloud.machine import Machine
from pytest_gpucloud.providers import make_provider
from pytest_gpucloud.replay import (
    remote_pytest_args,
    replay_collectreport,
    replay_infra_error,
    replay_test,
    replay_warning,
)
from pytest_gpucloud.request import GpuRequest
from pytest_gpucloud.settings import OPTIONS

if TYPE_CHECKING:
    from pytest_gpucloud.providers.base import Provider
    from pytest_gpucloud.settings import Settings

REQUEST_KEY = pytest.StashKey[GpuRequest]()
SKIP_REASON = "needs a GPU: run with --gpu-cloud"
START_TIMEOUT = 120.0
SHUTDOWN_TIMEOUT = 120.0
SIMULATED_NOTE = (
    "the simulated GPU cloud: instances are processes on this machine and "
    '"GPU" tests run on its CPU'
)


@dataclass(frozen=True)
class InstanceView:
    id: str
    gpu: str
    region: str
    state: str
    seconds: float
    cost: float


class GpuCloudHandle:
    """What the ``gpu_cloud`` fixture gives a test: the fleet as it is now."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    @property
    def provider(self) -> str:
        return self._controller.provider_name

    @property
    def instances(self) -> list[InstanceView]:
        fleet = self._controller.fleet
        machines = fleet.machines if fleet else []
        return [
            InstanceView(b.instance_id, b.gpu, b.region, m.state.value, b.seconds, b.cost)
            for m, b in zip(
                [m for m in machines if m.instance is not None], cost.bills(machines), strict=True
            )
        ]

    @property
    def cost_so_far(self) -> float:
        return sum(view.cost for view in self.instances)


class Controller:
    def __init__(self, config: pytest.Config, settings: Settings, provider_name: str) -> None:
        self.config = config
        self.settings = settings
        self.provider_name = provider_name
        self.engine = Engine()
        self.provider: Provider | None = None
        self.fleet: Fleet | None = None
        self._next: dict[str, str | None] = {}
        self._replayed: set[int] = set()
        self._shut_down = False

    def handle(self) -> GpuCloudHandle:
        return GpuCloudHandle(self)

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        line = f"gpu-cloud: provider {self.provider_name}"
        if self.provider_name == "sim":
            line += f" ({SIMULATED_NOTE})"
        return [line]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        planned = [
            (item, item.stash[REQUEST_KEY]) for item in session.items if REQUEST_KEY in item.stash
        ]
        if not planned or self.config.option.collectonly:
            return
        try:
            fleet = self._start_fleet()
            catalog = self.engine.run(fleet.catalog(), timeout=START_TIMEOUT)
        except (GpuCloudError, TimeoutError) as exc:
            raise pytest.UsageError(_prefixed(exc)) from None
        runnable: list[tuple[pytest.Item, GpuRequest]] = []
        for item, request in planned:
            try:
                check_known(request, catalog)
            except MarkerError as exc:
                session.items.remove(item)
                message = str(exc).replace(PREFIX, f"{PREFIX}{item.nodeid}: ", 1)
                report = pytest.CollectReport(item.nodeid, "failed", message, [])
                session.ihook.pytest_collectreport(report=report)
                continue
            runnable.append((item, request))
        self._plan(fleet, runnable)

    def _start_fleet(self) -> Fleet:
        self.provider = self.engine.run(
            make_provider(self.provider_name, self.settings), timeout=START_TIMEOUT
        )
        self.fleet = Fleet(
            self.provider,
            self.settings,
            rootdir=self.config.rootpath,
            start=self._worker_start(),
            project=self.config.rootpath.name,
        )
        return self.fleet

    def _worker_start(self) -> dict[str, Any]:
        return {
            "args": remote_pytest_args(self.config),
            "options": [{"name": o.flag, "takes_value": not o.is_switch} for o in OPTIONS],
            "ini": [o.ini for o in OPTIONS],
        }

    def _plan(self, fleet: Fleet, runnable: list[tuple[pytest.Item, GpuRequest]]) -> None:
        # A pool's consecutive tests share one remote session: each run names the next
        # test of the pool, so fixtures of wider scope stay up between them.
        by_pool: dict[Any, list[str]] = {}
        for item, request in runnable:
            by_pool.setdefault(request.pool_key, []).append(item.nodeid)
        for nodeids in by_pool.values():
            for current, following in zip(nodeids, [*nodeids[1:], None], strict=True):
                self._next[current] = following
        fleet.files_by_pool.update(
            {pool: sorted({n.split("::")[0] for n in ids}) for pool, ids in by_pool.items()}
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        request = item.stash.get(REQUEST_KEY, None)
        if request is None or self.fleet is None:
            return None
        try:
            run, machine = self.engine.run(
                self.fleet.run(item.nodeid, request, self._next.get(item.nodeid))
            )
        except GpuCloudError as exc:
            replay_infra_error(item, str(exc))
            return True
        self._replay_collection(item.session, machine)
        local_root = str(self.config.rootpath)
        for warning in run.warnings:
            replay_warning(
                self.config, warning, remote_root=machine.remote_root, local_root=local_root
            )
        if run.missing:
            replay_infra_error(
                item, f"gpu-cloud: {item.nodeid} was not collected on instance {machine.id}"
            )
        else:
            replay_test(item, run.reports, remote_root=machine.remote_root, local_root=local_root)
        return True

    def _replay_collection(self, session: pytest.Session, machine: Machine) -> None:
        if machine.collection is None or id(machine) in self._replayed:
            return
        self._replayed.add(id(machine))
        local_root = str(self.config.rootpath)
        for report in machine.collection.errors:
            replay_collectreport(
                session, report, remote_root=machine.remote_root, local_root=local_root
            )
        for warning in machine.collection.warnings:
            replay_warning(
                self.config, warning, remote_root=machine.remote_root, local_root=local_root
            )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self._shutdown()
        if self.fleet is not None and self.fleet.orphans and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.fleet is None:
            return
        terminalreporter.section("gpu-cloud")
        if self.provider_name == "sim":
            terminalreporter.write_line(f"provider sim: {SIMULATED_NOTE}")
        for line in cost.summary_lines(cost.bills(self.fleet.machines)):
            terminalreporter.write_line(line)
        for machine in self.fleet.machines:
            if machine.error:
                terminalreporter.write_line(f"{machine.id}: {machine.error}", yellow=True)
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
        if self.fleet is not None:
            try:
                self.engine.run(self.fleet.shutdown(), timeout=SHUTDOWN_TIMEOUT)
            except TimeoutError:
                self.fleet.orphans.extend(
                    m.id for m in self.fleet.machines if m.state.value != "released"
                )
        if self.provider is not None:
            with contextlib.suppress(TimeoutError):
                self.engine.run(self.provider.aclose(), timeout=30)

    def close(self) -> None:
        self._shutdown()
        self.engine.close()


def _prefixed(exc: BaseException) -> str:
    text = str(exc)
    return text if text.startswith("gpu-cloud:") else f"gpu-cloud: {text}"
