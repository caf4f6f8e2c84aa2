"""The simulated cloud's state: catalog, instances and their life cycle, client tokens.

Life of an instance: ``provisioning`` -> (``boot_delay_s``) ``running`` -> (delete, max
lifetime, preemption or sim stop) ``terminating`` -> (``terminate_delay_s``) ``terminated``;
or ``failed`` instead of ``running`` (fault ``boot_fail``). Every method runs on the
sim's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.core.wire import (
    CreateInstanceRequest,
    ErrorCode,
    GpuTypeModel,
    InstanceModel,
    InstanceStatus,
    SimInstanceRecord,
    SimRequestRecord,
)
from pytest_gpucloud.sim.config import SimConfig, SimSettings
from pytest_gpucloud.sim.faults import (
    AddressLate,
    BootFail,
    BootNever,
    DropSsh,
    FaultBook,
    InstanceRule,
    NoSocketForwarding,
    Preempt,
    SshRefuse,
    WrongGpu,
    WrongHostKey,
)
from pytest_gpucloud.sim.instances import SSH_HOST, SSH_USER, SimMachine, utcnow

_WATCH_INTERVAL_S = 0.02

TerminationReason = Literal["deleted", "max_lifetime", "preempted", "sim_stopped"]


class ApiError(Exception):
    """A refusal, answered as ``{"error": {"code", "message"}}`` with this HTTP status."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code: ErrorCode = code
        self.message = message
        self.retry_after = retry_after


class SimInstance:
    """One instance: its public record, its faults and, once booted, its machine."""

    def __init__(
        self,
        instance_id: str,
        request: CreateInstanceRequest,
        gpu: GpuTypeModel,
        region: str,
        client_key: asyncssh.SSHKey,
        faults: list[InstanceRule],
        ssh_user: str = SSH_USER,
        host_key: asyncssh.SSHKey | None = None,
    ) -> None:
        self.id = instance_id
        self.ssh_user = ssh_user
        self.injected_host_key = host_key
        self.request = request
        self.region = region
        self.price_per_hour = round(gpu.price_per_hour * request.count, 6)
        self.client_key = client_key
        self.faults = faults
        self.status: InstanceStatus = "provisioning"
        self.created_at = utcnow()
        self.running_at: datetime | None = None
        self.deleted_at: datetime | None = None
        self.terminated_at: datetime | None = None
        self.termination_reason: TerminationReason | None = None
        self.machine: SimMachine | None = None
        self.ssh_port: int | None = None
        self.announced_host_key: str | None = None
        self._boot: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._ending: asyncio.Task[None] | None = None

    def boot(self, delay: float, extra_path: str | None) -> None:
        self._boot = asyncio.get_running_loop().create_task(self._run_boot(delay, extra_path))

    def terminate(self, reason: TerminationReason, delay: float) -> asyncio.Task[None]:
        """Begin terminating (the first call only); the task ends at ``terminated``."""
        if self._ending is None:
            self.termination_reason = reason
            self.status = "terminating"
            if self._boot is not None:
                self._boot.cancel()
            for timer in self._timers:
                timer.cancel()
            for watcher in self._watchers:
                watcher.cancel()
            self._ending = asyncio.get_running_loop().create_task(self._end(delay))
        return self._ending

    def model(self) -> InstanceModel:
        return InstanceModel(
            id=self.id,
            status=self.status,
            gpu_type=self.request.gpu_type,
            count=self.request.count,
            region=self.region,
            price_per_hour=self.price_per_hour,
            created_at=self.created_at,
            labels=self.request.labels,
            **self._endpoint(),
        )

    def record(self) -> SimInstanceRecord:
        machine = self.machine
        return SimInstanceRecord(
            id=self.id,
            gpu_type=self.request.gpu_type,
            count=self.request.count,
            region=self.region,
            status=self.status,
            labels=self.request.labels,
            created_at=self.created_at,
            running_at=self.running_at,
            deleted_at=self.deleted_at,
            terminated_at=self.terminated_at,
            termination_reason=self.termination_reason,
            ssh_port=self.ssh_port,
            home=None if machine is None else str(machine.home),
            commands=[] if machine is None else [c.record() for c in machine.commands],
        )

    @property
    def address_shown(self) -> bool:
        """Running, and out of the null-IP window (fault ``address_late``)."""
        if self.status != "running" or self.running_at is None:
            return False
        late = max((f.delay_s for f in self.faults if isinstance(f, AddressLate)), default=0.0)
        return utcnow() >= self.running_at + timedelta(seconds=late)

    def _endpoint(self) -> dict[str, Any]:
        if not self.address_shown:
            return {}
        return {
            "ip": SSH_HOST,
            "ssh_port": self.ssh_port,
            "ssh_user": self.ssh_user,
            "ssh_host_key": self.announced_host_key,
        }

    def _has(self, kind: type[InstanceRule]) -> bool:
        return any(isinstance(fault, kind) for fault in self.faults)

    async def _run_boot(self, delay: float, extra_path: str | None) -> None:
        await asyncio.sleep(delay)
        if self._has(BootNever):
            return
        if self._has(BootFail):
            self.status = "failed"
            return
        gpu = f"{self.request.gpu_type}:{self.request.count}"
        gpu = next((f.gpu for f in self.faults if isinstance(f, WrongGpu)), gpu)
        wrong_key = self._has(WrongHostKey)
        injected = self.injected_host_key
        machine = self.machine = SimMachine(
            self.id,
            gpu,
            self.client_key,
            extra_path,
            user=self.ssh_user,
            host_key=None if wrong_key else injected,
        )
        machine.socket_forwarding = not self._has(NoSocketForwarding)
        self.ssh_port = machine.refuse() if self._has(SshRefuse) else await machine.listen()
        self.announced_host_key = (
            _other_host_key() if wrong_key and injected is None else machine.host_key_text
        )
        self.status = "running"
        self.running_at = utcnow()
        self._arm_faults(machine)

    def _arm_faults(self, machine: SimMachine) -> None:
        loop = asyncio.get_running_loop()
        for fault in self.faults:
            if isinstance(fault, DropSsh):
                if fault.on_file is not None:
                    self._on_file(machine.home / fault.on_file, machine.drop_connections)
                else:
                    machine.drop_after(fault.after_s, fault.after_commands)
            elif isinstance(fault, Preempt):
                lose = functools.partial(self.terminate, "preempted", 0.0)
                if fault.on_file is not None:
                    self._on_file(machine.home / fault.on_file, lose)
                else:
                    self._timers.append(loop.call_later(fault.after_s or 0.0, lose))

    def _on_file(self, path: Path, action: Callable[[], object]) -> None:
        async def watch() -> None:
            while not path.exists():
                await asyncio.sleep(_WATCH_INTERVAL_S)
            action()

        self._watchers.append(asyncio.get_running_loop().create_task(watch()))

    async def _end(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.machine is not None:
            self.machine.stop()
        self.status = "terminated"
        self.terminated_at = utcnow()


class Cloud:
    """The catalog, every instance ever created, the fault book and the request log."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.faults = FaultBook()
        self.requests: deque[SimRequestRecord] = deque(maxlen=10_000)
        self.instances: dict[str, SimInstance] = {}
        self._by_token: dict[str, SimInstance] = {}

    def configure(self, patch: SimSettings) -> None:
        changes = {name: getattr(patch, name) for name in patch.model_fields_set}
        self.config = self.config.model_copy(update=changes)

    def create(
        self,
        request: CreateInstanceRequest,
        *,
        ssh_user: str = SSH_USER,
        host_key: asyncssh.SSHKey | None = None,
    ) -> SimInstance:
        """Create an instance, or return the one made earlier with this ``client_token``.

        A vendor dialect names its SSH user and may inject the machine's ``host_key``."""
        earlier = self._by_token.get(request.client_token)
        if earlier is not None:
            return earlier
        gpu = self._gpu_type(request.gpu_type)
        region = request.region or gpu.regions[0]
        if not gpu.available or region not in gpu.regions:
            raise ApiError(503, "out_of_capacity", f"no {gpu.name} capacity in {region}")
        instance = SimInstance(
            self._new_id(),
            request,
            gpu,
            region,
            _client_key(request.ssh_public_key),
            self.faults.take_instance(gpu.name),
            ssh_user,
            host_key,
        )
        self.instances[instance.id] = self._by_token[request.client_token] = instance
        instance.boot(self.config.boot_delay_s, self.config.extra_path)
        return instance

    def get(self, instance_id: str) -> SimInstance:
        instance = self.instances.get(instance_id)
        if instance is None:
            raise ApiError(404, "not_found", f"no instance {instance_id!r}")
        return instance

    def live(self, labels: dict[str, str]) -> list[SimInstance]:
        """The instances not terminated yet that carry all these labels."""
        return [
            instance
            for instance in self.instances.values()
            if instance.status != "terminated" and labels.items() <= instance.request.labels.items()
        ]

    def delete(self, instance_id: str) -> None:
        instance = self.get(instance_id)
        if instance.status == "terminated":
            raise ApiError(404, "not_found", f"instance {instance_id!r} is already terminated")
        instance.deleted_at = instance.deleted_at or utcnow()
        instance.terminate("deleted", self.config.terminate_delay_s)

    async def enforce_lifetimes(self) -> None:
        """Terminate instances past ``max_lifetime_s`` (scaled), checking periodically."""
        while True:
            await asyncio.sleep(self.config.lifetime_check_interval_s)
            now = utcnow()
            for instance in list(self.instances.values()):
                lifetime = instance.request.max_lifetime_s * self.config.lifetime_scale
                if now >= instance.created_at + timedelta(seconds=lifetime):
                    instance.terminate("max_lifetime", self.config.terminate_delay_s)

    async def shutdown(self) -> None:
        """Terminate every instance now and wait until all are gone."""
        endings = [i.terminate("sim_stopped", 0.0) for i in self.instances.values()]
        await asyncio.gather(*endings)

    def _gpu_type(self, name: str) -> GpuTypeModel:
        for gpu in self.config.catalog:
            if gpu.name == name:
                return gpu
        raise ApiError(400, "invalid_request", f"unknown gpu_type {name!r}")

    def _new_id(self) -> str:
        while (instance_id := f"i-{secrets.token_hex(4)}") in self.instances:
            pass
        return instance_id


def _client_key(text: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ApiError(422, "invalid_request", f"ssh_public_key: {exc}") from exc


def _other_host_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
