"""One instance and the remote pytest session on it: bring-up and release.

A :class:`Machine` moves through :class:`MachineState`::

    requested -> booting -> connecting -> ready <-> busy -> releasing -> released
    any state before released -> failed -> released

Bring-up is a pipeline of steps (create with failover, boot, SSH, code sync, worker); each
step raises a :class:`~pytest_gpucloud.errors.GpuCloudError` naming the instance and cause.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_gpucloud import remote
from pytest_gpucloud.errors import NotFound, OutOfCapacity, ProviderError
from pytest_gpucloud.transport import ssh
from pytest_gpucloud.transport.sync import sync
from pytest_gpucloud.transport.worker_link import REMOTE_PACKAGE, Collection, WorkerLink

if TYPE_CHECKING:
    import asyncssh

    from pytest_gpucloud.catalog import Offer
    from pytest_gpucloud.providers.base import Instance, Provider
    from pytest_gpucloud.request import GpuRequest
    from pytest_gpucloud.settings import Settings

DELETE_VERIFY_S = 30.0


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


@dataclass(frozen=True)
class Launcher:
    """What bringing a machine up needs: the provider, the session's SSH key, the settings,
    the files to mirror and the worker's start frame."""

    provider: Provider
    settings: Settings
    rootdir: Path
    labels: dict[str, str]
    start: dict[str, Any]
    key: asyncssh.SSHKey = field(default_factory=ssh.new_client_key)

    async def create(self, request: GpuRequest, offers: list[Offer]) -> Machine:
        """Create an instance of the first offer with capacity; out of capacity moves on."""
        tried: list[str] = []
        for offer in offers:
            try:
                instance = await self.provider.create(
                    offer,
                    count=request.count,
                    image=request.image or self.settings.image,
                    ssh_public_key=ssh.public_key_line(self.key),
                    labels=self.labels,
                    max_lifetime_s=self.settings.lifetime_s,
                    client_token=uuid.uuid4().hex,
                )
            except OutOfCapacity:
                tried.append(f"{offer.gpu.name} in {offer.region}")
                continue
            return Machine(
                pool=request.pool_key,
                offer=offer,
                count=request.count,
                instance=instance,
                created_at=instance.created_at,
            )
        raise ProviderError(f"out of capacity for {request.canonical()} (tried {', '.join(tried)})")

    async def bring_up(self, machine: Machine, files: list[str]) -> None:
        """Boot, connect, sync the code and start the worker, which collects ``files``."""
        assert machine.instance is not None
        boot_timeout = self.settings.boot_timeout
        deadline = time.monotonic() + boot_timeout
        machine.state = MachineState.BOOTING
        machine.instance = await self.provider.wait_ready(machine.instance, boot_timeout)
        machine.state = MachineState.CONNECTING
        machine.conn = await ssh.connect(
            machine.instance, self.key, timeout=max(1.0, deadline - time.monotonic())
        )
        result = await sync(
            machine.conn,
            self.rootdir,
            f"gpucloud/{self.rootdir.name}",
            extra=_remote_package_files(),
        )
        machine.remote_root = result.remote_root
        start = dict(self.start)
        start["args"] = [*start["args"], *files]
        machine.link, machine.collection = await WorkerLink.start(
            machine.conn,
            machine.id,
            workspace=result.remote_root,
            package_dir=f"{result.remote_root}/.gpucloud/pkg",
            start=start,
            timeout=max(30.0, deadline - time.monotonic()),
        )
        machine.ready_at = time.time()
        machine.state = MachineState.READY

    async def release(self, machine: Machine, *, failed: bool = False) -> bool:
        """Stop the worker, close SSH, delete the instance and verify it is gone.

        Returns False when the instance may still be alive (an orphan); idempotent.
        """
        if machine.state in (MachineState.RELEASING, MachineState.RELEASED):
            return True
        machine.state = MachineState.FAILED if failed else MachineState.RELEASING
        if machine.link is not None:
            await machine.link.close(timeout=5.0)
        if machine.conn is not None:
            machine.conn.close()
        if machine.instance is not None:
            machine.deleted_at = time.time()
            try:
                await self.provider.delete(machine.id)
                await self._verify_deleted(machine.id)
            except (ProviderError, TimeoutError) as exc:
                machine.error = f"delete failed: {exc}"
                return False
        machine.state = MachineState.RELEASED
        return True

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


def _remote_package_files() -> dict[str, Path]:
    source = Path(remote.__file__).parent
    return {
        f".gpucloud/pkg/{REMOTE_PACKAGE}/{path.name}": path for path in sorted(source.glob("*.py"))
    }
