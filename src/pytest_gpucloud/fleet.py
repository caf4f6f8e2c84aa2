"""The fleet: every instance of a session, from create to verified delete.

A :class:`Machine` moves through :class:`MachineState`::

    requested -> booting -> connecting -> ready <-> busy -> releasing -> released
                      any state before released -> failed -> releasing -> released

The fleet lives in the controlling process only; it leases a ready machine to each test
whose request it fits, runs the test there and meters the time.
"""

from __future__ import annotations

import asyncio
import enum
import getpass
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_gpucloud import remote
from pytest_gpucloud.catalog import GpuType, Offer, explain_infeasible, feasible_offers
from pytest_gpucloud.errors import (
    GpuCloudError,
    InstanceError,
    NotFound,
    OutOfCapacity,
    ProviderError,
    RemoteError,
)
from pytest_gpucloud.transport import ssh
from pytest_gpucloud.transport.sync import sync
from pytest_gpucloud.transport.worker_link import REMOTE_PACKAGE, Collection, TestRun, WorkerLink

if TYPE_CHECKING:
    import asyncssh

    from pytest_gpucloud.providers.base import Instance, Provider
    from pytest_gpucloud.request import GpuRequest
    from pytest_gpucloud.settings import Settings

DELETE_VERIFY_S = 30.0
REPLACEMENTS_PER_POOL = 2


class MachineState(str, enum.Enum):
    """Where a machine is in its life (see the module docstring for the moves)."""

    REQUESTED = "requested"
    BOOTING = "booting"
    CONNECTING = "connecting"
    READY = "ready"
    BUSY = "busy"
    RELEASING = "releasing"
    RELEASED = "released"
    FAILED = "failed"


@dataclass(eq=False)
class Machine:
    """One instance and the remote pytest session on it."""

    pool: Any
    offer: Offer
    count: int
    state: MachineState = MachineState.REQUESTED
    instance: Instance | None = None
    requested_at: float = field(default_factory=time.time)
    created_at: float | None = None
    ready_at: float | None = None
    deleted_at: float | None = None
    tests_run: int = 0
    error: str | None = None
    conn: asyncssh.SSHClientConnection | None = None
    link: WorkerLink | None = None
    remote_root: str = ""
    collection: Collection | None = None

    @property
    def id(self) -> str:
        return self.instance.id if self.instance else "(not created)"

    @property
    def label(self) -> str:
        """How test lines and status lines name this machine: ``A100-80GB i-3f2a``."""
        count = f":{self.count}" if self.count > 1 else ""
        return f"{self.offer.gpu.name}{count} {self.id}"

    @property
    def seconds(self) -> float:
        """Billed seconds: from the provider's create time to the delete request."""
        if self.created_at is None:
            return 0.0
        return max(0.0, (self.deleted_at or time.time()) - self.created_at)

    @property
    def price_per_hour(self) -> float:
        return self.instance.price_per_hour if self.instance else self.offer.price(self.count)


class Fleet:
    """Provisions, leases, runs tests on and deletes instances of one provider."""

    def __init__(
        self,
        provider: Provider,
        settings: Settings,
        *,
        rootdir: Path,
        start: dict[str, Any],
        project: str,
    ) -> None:
        self.provider = provider
        self.settings = settings
        self.rootdir = rootdir
        self.session_id = uuid.uuid4().hex[:12]
        self.machines: list[Machine] = []
        self.orphans: list[str] = []
        self._start = start
        self.files_by_pool: dict[Any, list[str]] = {}
        self._key = ssh.new_client_key()
        self._catalog: list[GpuType] | None = None
        self._pool_errors: dict[Any, str] = {}
        self._replacements: dict[Any, int] = {}
        self._labels = _labels(self.session_id, project, settings.lifetime_s)
        self._closed = False

    async def catalog(self) -> list[GpuType]:
        if self._catalog is None:
            self._catalog = await self.provider.catalog()
        return self._catalog

    async def run(
        self, nodeid: str, request: GpuRequest, nextid: str | None
    ) -> tuple[TestRun, Machine]:
        """Run one test on a machine that fits ``request``; infrastructure trouble raises."""
        machine = await self._lease(request)
        assert machine.link is not None
        timeout = request.timeout_s or self.settings.timeout
        try:
            run = await machine.link.run(nodeid, nextid, timeout)
        except RemoteError as exc:
            machine.error = str(exc)
            self._replacements[request.pool_key] = self._replacements.get(request.pool_key, 0) + 1
            await self._release(machine, MachineState.FAILED)
            raise
        machine.tests_run += 1
        machine.state = MachineState.READY
        return run, machine

    async def _lease(self, request: GpuRequest) -> Machine:
        pool = request.pool_key
        for machine in self.machines:
            if machine.pool == pool and machine.state is MachineState.READY:
                machine.state = MachineState.BUSY
                return machine
        if pool in self._pool_errors:
            raise InstanceError(self._pool_errors[pool])
        if self._replacements.get(pool, 0) > REPLACEMENTS_PER_POOL:
            raise InstanceError(
                f"gave up on {request.canonical()}: {REPLACEMENTS_PER_POOL} replacement "
                "instances were lost already"
            )
        try:
            machine = await self._provision(request)
        except GpuCloudError as exc:
            self._pool_errors[pool] = str(exc)
            raise
        machine.state = MachineState.BUSY
        return machine

    async def _provision(self, request: GpuRequest) -> Machine:
        catalog = await self.catalog()
        offers = feasible_offers(request, catalog)
        if not offers:
            raise ProviderError(explain_infeasible(request, catalog))
        tried: list[str] = []
        for offer in offers:
            machine = Machine(pool=request.pool_key, offer=offer, count=request.count)
            try:
                instance = await self.provider.create(
                    offer,
                    count=request.count,
                    image=request.image or self.settings.image,
                    ssh_public_key=ssh.public_key_line(self._key),
                    labels=self._labels,
                    max_lifetime_s=self.settings.lifetime_s,
                    client_token=uuid.uuid4().hex,
                )
            except OutOfCapacity:
                tried.append(f"{offer.gpu.name} in {offer.region}")
                continue
            machine.instance = instance
            machine.created_at = instance.created_at
            self.machines.append(machine)
            try:
                await self._bring_up(machine)
            except BaseException as exc:
                machine.error = str(exc)
                await asyncio.shield(self._release(machine, MachineState.FAILED))
                raise
            return machine
        raise ProviderError(f"out of capacity for {request.canonical()} (tried {', '.join(tried)})")

    async def _bring_up(self, machine: Machine) -> None:
        assert machine.instance is not None
        deadline = time.monotonic() + self.settings.boot_timeout
        machine.state = MachineState.BOOTING
        machine.instance = await self.provider.wait_ready(
            machine.instance, self.settings.boot_timeout
        )
        machine.state = MachineState.CONNECTING
        machine.conn = await ssh.connect(
            machine.instance, self._key, timeout=max(1.0, deadline - time.monotonic())
        )
        result = await sync(
            machine.conn,
            self.rootdir,
            f"gpucloud/{self.rootdir.name}",
            extra=_remote_package_files(),
        )
        machine.remote_root = result.remote_root
        start = dict(self._start)
        start["args"] = [*start["args"], *self.files_by_pool.get(machine.pool, [])]
        machine.link, collection = await WorkerLink.start(
            machine.conn,
            machine.id,
            workspace=result.remote_root,
            package_dir=f"{result.remote_root}/.gpucloud/pkg",
            start=start,
            timeout=max(30.0, deadline - time.monotonic()),
        )
        machine.collection = collection
        machine.ready_at = time.time()
        machine.state = MachineState.READY

    async def _release(
        self, machine: Machine, state: MachineState = MachineState.RELEASING
    ) -> None:
        """Stop the worker, close SSH, delete the instance and verify it is gone."""
        if machine.state in (MachineState.RELEASING, MachineState.RELEASED):
            return
        machine.state = MachineState.RELEASING if state is MachineState.RELEASING else state
        if machine.link is not None:
            await machine.link.close(timeout=5.0)
        if machine.conn is not None:
            machine.conn.close()
        if machine.instance is None:
            machine.state = MachineState.RELEASED
            return
        machine.deleted_at = time.time()
        try:
            await self.provider.delete(machine.id)
            await self._verify_deleted(machine.id)
        except (ProviderError, TimeoutError) as exc:
            machine.error = f"delete failed: {exc}"
            self.orphans.append(machine.id)
            return
        machine.state = MachineState.RELEASED

    async def _verify_deleted(self, instance_id: str) -> None:
        deadline = time.monotonic() + DELETE_VERIFY_S
        interval = 0.05
        while time.monotonic() < deadline:
            try:
                instance = await self.provider.get(instance_id)
            except NotFound:
                return
            if instance.status == "terminated":
                return
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 2.0)
        raise TimeoutError(
            f"instance {instance_id} was still alive {DELETE_VERIFY_S:g} s after its delete"
        )

    async def shutdown(self) -> list[Machine]:
        """Release every machine at once; idempotent."""
        await asyncio.gather(*(self._release(m) for m in self.machines))
        return self.machines


_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._:@+-]")


def _labels(session_id: str, project: str, lifetime_s: int) -> dict[str, str]:
    try:
        owner = getpass.getuser()
    except (KeyError, OSError):
        owner = "unknown"
    return {
        "gpucloud-session": session_id,
        "gpucloud-project": _LABEL_CHARS.sub("-", project)[:64] or "project",
        "gpucloud-owner": _LABEL_CHARS.sub("-", owner)[:64] or "unknown",
        "gpucloud-expires": str(int(time.time()) + lifetime_s),
    }


def _remote_package_files() -> dict[str, Path]:
    source = Path(remote.__file__).parent
    return {
        f".gpucloud/pkg/{REMOTE_PACKAGE}/{path.name}": path for path in sorted(source.glob("*.py"))
    }
