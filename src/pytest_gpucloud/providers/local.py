"""The ``local`` provider: this machine's GPUs, one slot per GPU (a self-hosted GPU runner).

``nvidia-smi`` lists the GPUs; an instance is a lease of as many GPUs of one type as its
request counts, held with a file lock per GPU (in this user's temp folder), so concurrent
sessions and processes never share a GPU. Its processes get ``CUDA_VISIBLE_DEVICES`` (and
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so CUDA numbers the GPUs as nvidia-smi does), this
process's environment less ``GPUCLOUD_*`` and ``PYTEST_*``, and this Python first on PATH.

No sshd is involved, yet every lease is served by an SSH server of its own, in this process
on 127.0.0.1 (a fresh host key, pinned; only the session's key accepted): code sync,
container runtime, setup, health check and worker then take exactly the path they take on
a cloud instance. Each GPU slot has a home folder of its own, where every project keeps a
warm workspace between sessions (the slot's lock guards it: a second concurrent session
takes another slot, with a workspace of its own, or waits); taking a slot removes its
workspaces idle for more than ``--gpu-workspace-ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import ConfigError, OutOfCapacity
from pytest_gpucloud.core.gpus import SMI_FORMAT, csv_rows, type_name
from pytest_gpucloud.core.private import private_dir
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.providers.base import Instance
from pytest_gpucloud.providers.leasing import LeaseBook, lease
from pytest_gpucloud.remote.workspaces import WORKSPACES, sweep, take_lease
from pytest_gpucloud.transport import ssh
from pytest_gpucloud.transport.exec_server import kill_group, listen_exec, run_exec, within_home

if TYPE_CHECKING:
    from pytest_gpucloud.config.settings import Settings

REGION = "local"
SSH_USER = "local"
STOP_GRACE_S = 5.0
_NO_GPU = "--gpu-provider local found no GPU on this machine"


@dataclass(frozen=True)
class LocalGpu:
    """One GPU as nvidia-smi lists it."""

    index: str
    uuid: str
    name: str
    memory_mib: int

    @property
    def type(self) -> str:
        return type_name(self.name)


def list_gpus() -> list[LocalGpu]:
    """This machine's GPUs; ConfigError (a usage error) when there is none to use."""
    query = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", SMI_FORMAT]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise ConfigError(
            f"{_NO_GPU}: nvidia-smi is not on the PATH (no NVIDIA driver?); try the plugin "
            "on the CPU with --gpu-provider sim"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{_NO_GPU}: nvidia-smi could not run ({exc})") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise ConfigError(f"{_NO_GPU}: nvidia-smi failed ({said[-1] if said else done.returncode})")
    gpus = []
    for row in csv_rows(done.stdout):
        if len(row) < 4 or not row[3].isdigit():
            raise ConfigError(f"{_NO_GPU}: nvidia-smi answered {', '.join(row)!r}")
        gpus.append(LocalGpu(row[0], row[1], row[2], int(row[3])))
    if not gpus:
        raise ConfigError(f"{_NO_GPU}: nvidia-smi lists none")
    return gpus


class _SlotLock:
    """An exclusive lock on one GPU, or on a slot's workspaces, across processes (flock:
    released when this process ends, however it ends)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def take(cls, path: Path) -> _SlotLock | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class _SessionKeyOnly(asyncssh.SSHServer):
    def __init__(self, host: _Host) -> None:
        self._host = host

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._host.connections.add(conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == SSH_USER and key.public_data == self._host.client_key.public_data

    def unix_connection_requested(self, dest_path: str) -> bool:
        """A gpu_service in a container is reached through a socket in the workspace."""
        return within_home(dest_path, self._host.home)


@dataclass(eq=False)
class _Host:
    """The SSH side of one lease: runs each exec request as a process of this machine."""

    client_key: asyncssh.SSHKey
    home: Path
    env: dict[str, str]
    host_key: asyncssh.SSHKey = field(default_factory=ssh.new_client_key)
    connections: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    group_ids: list[int] = field(default_factory=list)
    serving: set[asyncio.Task[None]] = field(default_factory=set)
    acceptor: asyncssh.SSHAcceptor | None = None

    async def listen(self) -> int:
        self.acceptor = await listen_exec(lambda: _SessionKeyOnly(self), self.host_key, self._serve)
        return self.acceptor.get_port()

    async def _serve(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.command is None:
            process.stderr.write(b"commands only (no shell)\n")
            process.exit(1)
            return
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        try:
            await run_exec(process, cwd=self.home, env=self.env, group_ids=self.group_ids)
        finally:
            self.serving.discard(task)

    async def stop(self) -> None:
        """End the lease's connections and kill its processes, then wait (a bounded while)
        until their output has ended: a process killed with a GPU context, or a child it
        left, can hold its pipes open for a while, and nothing of it may outlive the loop."""
        if self.acceptor is not None:
            self.acceptor.close()
        for conn in list(self.connections):
            conn.abort()
        for group_id in self.group_ids:
            kill_group(group_id)
        if self.serving:
            _, left = await asyncio.wait(self.serving, timeout=STOP_GRACE_S)
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left, timeout=STOP_GRACE_S)


@dataclass(eq=False)
class _Lease:
    instance: Instance
    gpus: list[LocalGpu]
    locks: list[_SlotLock]
    host: _Host


class LocalProvider(LeaseBook[_Lease]):
    """This machine's GPUs as instances; see the module docstring."""

    name = "local"
    simulated = False
    where = "on this machine"

    def __init__(
        self,
        gpus: list[LocalGpu],
        *,
        lease_timeout: float,
        lock_dir: Path,
        workspace_ttl: float = 86400.0,
    ) -> None:
        self.gpus = gpus
        self._lease_timeout = lease_timeout
        self._lock_dir = lock_dir
        self._workspace_ttl = workspace_ttl
        super().__init__()

    @classmethod
    async def start(cls, settings: Settings) -> LocalProvider:
        gpus = await asyncio.to_thread(list_gpus)
        lock_dir = private_dir(_lock_dir())
        return cls(
            gpus,
            lease_timeout=settings.boot_timeout,
            lock_dir=lock_dir,
            workspace_ttl=settings.workspace_ttl,
        )

    async def catalog(self) -> list[GpuType]:
        types: dict[str, GpuType] = {}
        for gpu in self.gpus:
            vram = max(1, round(gpu.memory_mib / 1024))
            types.setdefault(gpu.type, GpuType(gpu.type, vram, 0.0, True, (REGION,)))
        return list(types.values())

    async def create(
        self,
        offer: Offer,
        *,
        count: int,
        image: str,
        ssh_public_key: str,
        labels: dict[str, str],
        max_lifetime_s: int,
        client_token: str,
    ) -> Instance:
        fitting = [gpu for gpu in self.gpus if gpu.type == offer.gpu.name]
        if len(fitting) < count:
            raise OutOfCapacity(
                f"this machine has {len(fitting)} {offer.gpu.name} GPU(s); {count} asked for"
            )

        def held_here() -> list[LocalGpu]:
            return [g for held in self._leases.values() for g in held.gpus]

        async def try_once() -> list[tuple[LocalGpu, _SlotLock]] | None:
            taken: list[tuple[LocalGpu, _SlotLock]] = []
            for gpu in fitting:
                lock = None if gpu in held_here() else _SlotLock.take(self._lock_path(gpu))
                if lock is not None:
                    taken.append((gpu, lock))
                if len(taken) == count:
                    return taken
            for _, lock in taken:
                lock.release()
            return None

        taken = await lease(
            try_once,
            what=f"the {len(fitting)} {offer.gpu.name} GPU(s) of this machine",
            all_held_here=lambda: len(fitting) - len(set(held_here()) & set(fitting)) < count,
            timeout=self._lease_timeout,
        )
        gpus = [gpu for gpu, _ in taken]
        try:
            return await self._serve_lease(
                offer, gpus, [lock for _, lock in taken], ssh_public_key, labels
            )
        except BaseException:
            for _, lock in taken:
                lock.release()
            raise

    async def _serve_lease(
        self,
        offer: Offer,
        gpus: list[LocalGpu],
        locks: list[_SlotLock],
        ssh_public_key: str,
        labels: dict[str, str],
    ) -> Instance:
        slot = "-".join(gpu.index for gpu in gpus)
        # The same GPUs, the same directory: a workspace (and a setup's editable install)
        # keeps its path from one session to the next.
        uuids = ",".join(gpu.uuid or gpu.index for gpu in gpus).encode()
        home = private_dir(
            self._lock_dir / f"slot-{hashlib.sha1(uuids, usedforsecurity=False).hexdigest()[:12]}"
        )
        workspaces = await _take_workspaces(home, self._workspace_ttl)
        host = _Host(asyncssh.import_public_key(ssh_public_key), home, _environment(gpus))
        port = await host.listen()
        instance = Instance(
            id=f"local-gpu{slot}",
            gpu_type=offer.gpu.name,
            count=len(gpus),
            region=REGION,
            price_per_hour=0.0,
            status="running",
            created_at=time.time(),
            labels=dict(labels),
            ip="127.0.0.1",
            ssh_port=port,
            ssh_user=SSH_USER,
            ssh_host_key=host.host_key.export_public_key().decode().strip(),
        )
        self._leases[instance.id] = _Lease(instance, gpus, [*locks, workspaces], host)
        return instance

    async def wait_ready(self, instance: Instance, timeout: float) -> Instance:
        return instance

    async def connect(
        self, instance: Instance, session_key: asyncssh.SSHKey, timeout: float
    ) -> asyncssh.SSHClientConnection:
        return await ssh.connect(instance, session_key, timeout=timeout)

    async def delete(self, instance_id: str) -> None:
        held = self._leases.pop(instance_id, None)
        if held is not None:
            await held.host.stop()
            for lock in held.locks:
                lock.release()

    @staticmethod
    def slot_homes() -> list[Path]:
        """The home folders of this user's GPU slots, each with its workspaces."""
        return sorted(_lock_dir().glob("slot-*"))

    def _lock_path(self, gpu: LocalGpu) -> Path:
        return self._lock_dir / f"gpu-{gpu.uuid or gpu.index}.lock"


def _lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"pytest-gpucloud-{os.getuid()}"


async def _take_workspaces(home: Path, ttl_s: float) -> _SlotLock:
    """The lease lock of a slot's workspaces (held only a moment by ``cleanup``), with
    those idle for more than ``ttl_s`` removed."""
    for _ in range(100):
        lock = await asyncio.to_thread(take_lease, os.fspath(home))
        if isinstance(lock, str) and lock.startswith("refused: "):
            raise ConfigError(f"--gpu-provider local refuses its folder: {lock[9:]}")
        if not isinstance(lock, str):
            with lock:
                await asyncio.to_thread(sweep, os.fspath(home / WORKSPACES), ttl_s)
                return _SlotLock(os.dup(lock.fileno()))  # the flock lives on in the copy
        await asyncio.sleep(0.1)
    raise OutOfCapacity(f"the workspaces of {home} stayed locked by another process")


def _environment(gpus: list[LocalGpu]) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("GPUCLOUD_", "PYTEST_"))
    }
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu.index for gpu in gpus)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env
