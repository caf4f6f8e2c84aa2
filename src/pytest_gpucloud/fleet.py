"""The fleet: every instance of a session, leased to the tests that fit it.

The fleet lives in the controlling process only. It picks offers, asks the
:class:`~pytest_gpucloud.machine.Launcher` to bring machines up, leases a ready machine to
each test whose request it fits, runs the test there, and releases every machine at the end.
"""

from __future__ import annotations

import asyncio
import getpass
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from pytest_gpucloud.catalog import GpuType, explain_infeasible, feasible_offers
from pytest_gpucloud.errors import GpuCloudError, InstanceError, ProviderError, RemoteError
from pytest_gpucloud.machine import Launcher, Machine, MachineState

if TYPE_CHECKING:
    from pathlib import Path

    from pytest_gpucloud.providers.base import Provider
    from pytest_gpucloud.request import GpuRequest
    from pytest_gpucloud.settings import Settings
    from pytest_gpucloud.transport.worker_link import TestRun

REPLACEMENTS_PER_POOL = 2


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
        self.session_id = uuid.uuid4().hex[:12]
        self.machines: list[Machine] = []
        self.orphans: list[str] = []
        self.files_by_pool: dict[Any, list[str]] = {}
        self.launcher = Launcher(
            provider,
            settings,
            rootdir,
            _labels(self.session_id, project, settings.lifetime_s),
            start,
        )
        self._catalog: list[GpuType] | None = None
        self._pool_errors: dict[Any, str] = {}
        self._replacements: dict[Any, int] = {}

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
            pool = request.pool_key
            self._replacements[pool] = self._replacements.get(pool, 0) + 1
            await self._release(machine, failed=True)
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
        machine = await self.launcher.create(request, offers)
        self.machines.append(machine)
        try:
            await self.launcher.bring_up(machine, self.files_by_pool.get(machine.pool, []))
        except BaseException as exc:
            machine.error = str(exc)
            await asyncio.shield(self._release(machine, failed=True))
            raise
        return machine

    async def _release(self, machine: Machine, *, failed: bool = False) -> None:
        if not await self.launcher.release(machine, failed=failed):
            self.orphans.append(machine.id)

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
