"""The fleet as a process that owns gpu items sees it: plan its tests, run one, get a result.

The fleet lives in the controlling process only (the one process without xdist, xdist's
controller with it). :class:`FleetService` is its front desk there, on the engine loop. A
process that owns items reaches it through a :class:`FleetAccess`: :class:`LocalAccess` in
the same process, :class:`pytest_gpucloud.desk.ipc.IpcClient` from an xdist worker. Both hand back
the same :class:`RunResult`, which that process replays; one code path, two transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pytest_gpucloud.core.catalog import check_known
from pytest_gpucloud.core.errors import PREFIX, GpuCloudError, MarkerError, TimeLimitExceeded
from pytest_gpucloud.features import instance_handle
from pytest_gpucloud.features.gpu_service import ServiceAccess
from pytest_gpucloud.features.service_desk import ServiceDesk, ServiceHome
from pytest_gpucloud.scheduling import cost

if TYPE_CHECKING:
    from pytest_gpucloud.core.catalog import GpuType
    from pytest_gpucloud.core.engine import Engine
    from pytest_gpucloud.core.request import GpuRequest, Tests
    from pytest_gpucloud.features.artifacts import ArtifactStore
    from pytest_gpucloud.features.gpu_service import Declared
    from pytest_gpucloud.features.instance_handle import InstanceHandle, Lease
    from pytest_gpucloud.features.service_desk import ServiceSpec, ServiceView
    from pytest_gpucloud.machine.machine import Machine
    from pytest_gpucloud.remote.protocol import Message
    from pytest_gpucloud.scheduling.cost import Placement
    from pytest_gpucloud.scheduling.fleet import Fleet
    from pytest_gpucloud.scheduling.planner import Plan
    from pytest_gpucloud.scheduling.progress import Event

START_TIMEOUT = 120.0
# The owner of the runs of a session without xdist; xdist workers use their worker id.
LOCAL_OWNER = "main"


@dataclass
class RunResult:
    """What running one gpu test gave: everything its item's process needs to replay it.

    Plain JSON data (it crosses the xdist socket as is). ``error``: the test could not run
    or finish for an infrastructure reason (a ``gpu-cloud:`` message; replayed as a setup
    error, or, with the ``reports`` of the phases that ended before a time limit, as a
    failure of the phase it was in).
    ``missing``: the remote session did not collect it. ``collection_errors`` and
    ``collection_warnings``: the machine's remote collection, in the first result that
    machine gives, for whichever process gets it first. ``properties``: ``[name, value]``
    pairs for the test's ``user_properties`` (where its artifacts went).
    """

    nodeid: str
    reports: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Message] = field(default_factory=list)
    missing: bool = False
    error: str | None = None
    machine_id: str = ""
    machine_label: str = ""
    remote_root: str = ""
    collection_errors: list[dict[str, Any]] = field(default_factory=list)
    collection_warnings: list[Message] = field(default_factory=list)
    properties: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        return cls(**data)


@dataclass(frozen=True)
class InstanceView:
    """One instance of the session as tests see it (the ``gpu_cloud`` fixture)."""

    id: str
    gpu: str
    region: str
    state: str
    seconds: float
    cost: float


@dataclass(frozen=True)
class Outcome:
    """The fleet at the end of the session, for the terminal summary and the report."""

    machines: list[Machine]
    placements: dict[str, Placement]
    plan: Plan | None
    orphans: list[str]
    notes: list[str]
    data_lines: list[str]
    artifacts: ArtifactStore | None
    catalog: list[GpuType] = field(default_factory=list)


class FleetAccess(ServiceAccess, Protocol):
    """How a process that owns gpu items reaches the fleet (and the ``gpu_service``
    servers that the fleet's owner runs)."""

    def plan(self, tests: Tests, services: Sequence[Declared] = ()) -> dict[str, str]:
        """Check the gpu items' requests against the catalog and plan the session's
        instances (:meth:`Fleet.plan`, which also starts them), the ``gpu_service``
        servers' included; nodeid -> marker error.

        Starts the fleet on first use; a provider that cannot start raises GpuCloudError.
        """

    def run(self, nodeid: str, request: GpuRequest, nextid: str | None) -> RunResult:
        """Run one test on a machine that fits ``request``; never raises for the cloud's
        trouble (see :attr:`RunResult.error`)."""

    def instances(self) -> list[InstanceView]:
        """The session's instances so far."""

    def lease(self, request: GpuRequest) -> contextlib.AbstractContextManager[InstanceHandle]:
        """An instance of its own for ``request`` (``gpu_cloud.instance()``), deleted when
        the ``with`` block ends."""

    def close(self) -> None:
        """Let go of the fleet (not the fleet itself: its owner shuts it down)."""


class FleetService:
    """The fleet's front desk in the controlling process; call it on the engine loop.

    ``start`` makes the fleet, once, on the first call that needs it.
    """

    def __init__(self, start: Callable[[], Awaitable[Fleet]]) -> None:
        self._start = start
        self._starting: asyncio.Future[Fleet] | None = None
        self._fleet: Fleet | None = None
        self._reported: set[Machine] = set()
        self.services = ServiceDesk(self)

    async def fleet(self) -> Fleet:
        """The fleet, started by the first caller; a failed start fails every call alike."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_fleet())
        # Shielded: a caller that goes away (a crashed xdist worker) does not stop the start.
        return await asyncio.shield(self._starting)

    async def _start_fleet(self) -> Fleet:
        try:
            self._fleet = await asyncio.wait_for(self._start(), START_TIMEOUT)
        except asyncio.TimeoutError:
            raise GpuCloudError(
                f"the GPU provider did not start within {START_TIMEOUT:g} s"
            ) from None
        return self._fleet

    async def plan(self, tests: Tests, services: Sequence[Declared] = ()) -> dict[str, str]:
        """See :meth:`FleetAccess.plan`."""
        fleet = await self.fleet()
        try:
            catalog = await asyncio.wait_for(fleet.catalog(), START_TIMEOUT)
        except asyncio.TimeoutError:
            raise GpuCloudError(
                f"the GPU provider's catalog did not come within {START_TIMEOUT:g} s"
            ) from None
        errors: dict[str, str] = {}
        for nodeid, request in tests:
            if request is None:
                continue
            try:
                check_known(request, catalog)
            except MarkerError as exc:
                errors[nodeid] = str(exc).replace(PREFIX, f"{PREFIX}{nodeid}: ", 1)
        kept = [(nodeid, r) for nodeid, r in tests if nodeid not in errors]
        await fleet.plan(kept, [(s.name, s.request) for s in services])
        return errors

    async def run(
        self, nodeid: str, request: GpuRequest, nextid: str | None, owner: str
    ) -> RunResult:
        """See :meth:`FleetAccess.run`; ``owner``: the process asking (its runs stick to one
        machine per pool)."""
        try:
            fleet = await self.fleet()
            run, machine = await fleet.run(nodeid, request, nextid, owner=owner)
        except TimeLimitExceeded as exc:  # reported in the phase it was in
            return RunResult(
                nodeid,
                reports=exc.reports,
                error=str(exc),
                remote_root=exc.remote_root,
                properties=self._properties(nodeid),
            )
        except GpuCloudError as exc:
            return RunResult(nodeid, error=str(exc), properties=self._properties(nodeid))
        result = RunResult(
            nodeid,
            reports=run.reports,
            warnings=run.warnings,
            missing=run.missing,
            machine_id=machine.id,
            machine_label=machine.label,
            remote_root=machine.remote_root,
            properties=self._properties(nodeid),
        )
        if machine.collection is not None and machine not in self._reported:
            self._reported.add(machine)
            result.collection_errors = machine.collection.errors
            result.collection_warnings = machine.collection.warnings
        return result

    def _properties(self, nodeid: str) -> list[tuple[str, str]]:
        artifacts = self._fleet.artifacts if self._fleet is not None else None
        return artifacts.properties(nodeid) if artifacts is not None else []

    async def lease(self, request: GpuRequest) -> Lease:
        """A machine leased whole (``gpu_cloud.instance()``); see :meth:`Fleet.lease`."""
        return await (await self.fleet()).lease(request)

    async def release_lease(self, machine: Machine) -> None:
        await (await self.fleet()).release_lease(machine)

    async def service_home(self) -> ServiceHome:
        """For ``gpu_service``: logs come home beside the session's artifacts."""
        fleet = await self.fleet()
        artifacts = fleet.artifacts
        root = artifacts.root if artifacts is not None else fleet.launcher.rootdir / ".gpucloud"
        return ServiceHome(root / "gpu_service", this_machine=fleet.provider.name == "local")

    # -- for the controlling process's own session: its order, progress and end ------------

    @property
    def started(self) -> bool:
        """Whether the fleet has started (in this process)."""
        return self._fleet is not None

    async def expect(self, order: dict[str, tuple[GpuRequest, str | None]]) -> None:
        """See :meth:`Fleet.expect`; nothing before the fleet has started."""
        if self._fleet is not None:
            self._fleet.expect(order)

    def forget(self) -> None:
        """No queued test will run (``-x``, ``--maxfail``): their machines go now."""
        if self._fleet is not None:
            self._fleet.forget()

    def progress(self) -> list[Event]:
        """The fleet's status events since the last call (from any thread)."""
        return self._fleet.progress.drain() if self._fleet is not None else []

    async def shutdown(self, *, hurry: bool) -> None:
        """Stop the ``gpu_service`` servers, release every machine (``hurry``: no goodbyes
        to workers or servers, CI kills soon)."""
        if self._fleet is None:
            return
        await self.services.close(hurry=hurry)  # first: their logs come home
        if hurry:
            self._fleet.hurry()
        await self._fleet.shutdown()

    def give_up(self) -> None:
        """The shutdown did not finish in time: see :meth:`Fleet.give_up`."""
        if self._fleet is not None:
            self._fleet.give_up()

    async def finish_uploads(self) -> None:
        """Wait for the artifact uploads to S3 still running (after the deletes)."""
        if self._fleet is not None and self._fleet.artifacts is not None:
            await self._fleet.artifacts.finish()

    def note(self, text: str) -> None:
        """A line for the terminal summary about the teardown."""
        if self._fleet is not None:
            self._fleet.notes.append(text)

    def outcome(self) -> Outcome | None:
        """What the session's end reports (None: the fleet never started)."""
        fleet = self._fleet
        if fleet is None:
            return None
        return Outcome(
            machines=list(fleet.machines),
            placements=dict(fleet.placements),
            plan=fleet.planned,
            orphans=list(fleet.orphans),
            notes=list(fleet.notes),
            data_lines=fleet.data.summary_lines(),
            artifacts=fleet.artifacts,
            catalog=fleet.catalog_read,
        )

    async def instances(self) -> list[InstanceView]:
        machines = self._fleet.machines if self._fleet is not None else []
        return [
            InstanceView(
                bill.instance_id, bill.gpu, bill.region, m.state.value, bill.seconds, bill.cost
            )
            for m in machines
            for bill in cost.bills([m])
        ]


class LocalAccess:
    """The fleet in this very process: the service, run on the engine loop."""

    def __init__(
        self,
        engine: Engine,
        service: FleetService,
        while_waiting: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._service = service
        # called on this thread while a test runs remotely: status lines as they happen
        self._while_waiting = while_waiting

    def plan(self, tests: Tests, services: Sequence[Declared] = ()) -> dict[str, str]:
        return self._engine.run(self._service.plan(tests, services))

    def run(self, nodeid: str, request: GpuRequest, nextid: str | None) -> RunResult:
        return self._engine.run(
            self._service.run(nodeid, request, nextid, LOCAL_OWNER),
            while_waiting=self._while_waiting,
        )

    def instances(self) -> list[InstanceView]:
        return self._engine.run(self._service.instances())

    def lease(self, request: GpuRequest) -> contextlib.AbstractContextManager[InstanceHandle]:
        return instance_handle.lease(self._engine, self._service, request)

    def start_service(self, spec: ServiceSpec) -> ServiceView:
        return self._engine.run(self._service.services.start(spec))

    def service_logs(self, key: str) -> str:
        return self._engine.run(self._service.services.logs(key))

    def stop_service(self, key: str) -> None:
        self._engine.run(self._service.services.stop(key))

    def close(self) -> None:
        pass
