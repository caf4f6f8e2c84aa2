"""The ``ssh`` provider: static GPU hosts, reached over SSH, never created or deleted.

``--gpu-hosts gpu@10.0.0.5:22=A100-80GB:2,gpu@10.0.0.6=L4`` names each host with its GPU
type (and count). Host keys come from a known_hosts file (``--gpu-known-hosts``, default
``~/.ssh/known_hosts``), the login from ``--gpu-ssh-key`` or the usual keys and agent.

A host is leased, whole, to one instance at a time: the lease is an flock held on the host
(``~/.cache/pytest-gpucloud/lease.lock``) by a process that lives as long as the lease's
SSH connection (:mod:`pytest_gpucloud.remote.workspaces`, run as ``hold``), so concurrent
sessions and processes never share a host and a lease ends with its connection, however
this process ends. A second session waits for the lease (up to ``--gpu-boot-timeout``).
The lease also guards the host's warm workspaces: each project keeps its workspace there
between sessions, and taking a lease removes those idle for more than
``--gpu-workspace-ttl``. The launcher removes the session's container before the lease
ends.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_gpucloud.core.addresses import HOSTS_FORMAT, StaticHost, parse_hosts
from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import ConfigError, InstanceError, OutOfCapacity
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.providers.base import Instance
from pytest_gpucloud.providers.leasing import LeaseBook, lease
from pytest_gpucloud.remote import source
from pytest_gpucloud.transport import ssh
from pytest_gpucloud.transport.commands import Hub, Shell, hub_program

if TYPE_CHECKING:
    from pytest_gpucloud.config.settings import Settings

REGION = "static"
_GB = re.compile(r"(\d+)GB$", re.IGNORECASE)


@dataclass(eq=False)
class _Lease:
    instance: Instance
    conn: asyncssh.SSHClientConnection
    shell: Hub  # which holds the lease


class SshProvider(LeaseBook[_Lease]):
    """Static hosts as instances; see the module docstring."""

    name = "ssh"
    simulated = False
    where = "of a static host"

    def __init__(
        self,
        hosts: list[StaticHost],
        *,
        known_hosts: Path,
        client_key: asyncssh.SSHKey | None,
        lease_timeout: float,
        workspace_ttl: float = 86400.0,
    ) -> None:
        self.hosts = hosts
        self._workspace_ttl = workspace_ttl
        self._known_hosts = known_hosts
        self._client_key = client_key
        self._lease_timeout = lease_timeout
        super().__init__()

    @classmethod
    def from_settings(cls, settings: Settings) -> SshProvider:
        if not settings.hosts:
            raise ConfigError(f"--gpu-provider ssh needs its hosts: --gpu-hosts {HOSTS_FORMAT},...")
        known_hosts = Path(settings.known_hosts or "~/.ssh/known_hosts").expanduser()
        try:
            asyncssh.read_known_hosts(str(known_hosts))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"--gpu-provider ssh reads the hosts' keys from {known_hosts}, which cannot be "
                f"read ({type(exc).__name__}); add the hosts with ssh-keyscan -p PORT HOST >> "
                "FILE and name it with --gpu-known-hosts"
            ) from None
        key = None
        if settings.ssh_key is not None:
            try:
                key = asyncssh.read_private_key(Path(settings.ssh_key).expanduser())
            except (OSError, ValueError, asyncssh.KeyImportError) as exc:
                raise ConfigError(
                    f"--gpu-ssh-key {settings.ssh_key}: cannot be read as a private key "
                    f"({type(exc).__name__}); a key with a passphrase belongs in the SSH agent"
                ) from None
        return cls(
            parse_hosts(settings.hosts),
            known_hosts=known_hosts,
            client_key=key,
            lease_timeout=settings.boot_timeout,
            workspace_ttl=settings.workspace_ttl,
        )

    async def catalog(self) -> list[GpuType]:
        types: dict[str, GpuType] = {}
        for host in self.hosts:
            # The memory is known where the type names it (A10G-24GB); else 0, no vram= match.
            size = _GB.search(host.gpu)
            vram = int(size[1]) if size else 0
            types.setdefault(host.gpu, GpuType(host.gpu, vram, 0.0, True, (REGION,)))
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
        fitting = [h for h in self.hosts if h.gpu == offer.gpu.name and h.count >= count]
        if not fitting:
            raise OutOfCapacity(f"no host of --gpu-hosts has {count} x {offer.gpu.name}")

        async def try_once() -> _Lease | None:
            # An unreachable host is passed over while another one may serve.
            free = [h for h in fitting if h.instance_id not in self._leases]
            errors: list[InstanceError] = []
            for host in free:
                try:
                    held = await self._try_lease(host, labels)
                except InstanceError as exc:
                    errors.append(exc)
                    continue
                if held is not None:
                    return held
            if free and len(errors) == len(free):
                raise errors[0]
            return None

        held = await lease(
            try_once,
            what=f"the {len(fitting)} host(s) with {count} x {offer.gpu.name}",
            all_held_here=lambda: all(h.instance_id in self._leases for h in fitting),
            timeout=self._lease_timeout,
        )
        self._leases[held.instance.id] = held
        return held.instance

    async def _try_lease(self, host: StaticHost, labels: dict[str, str]) -> _Lease | None:
        conn = await self._login(host)
        try:
            # One exec: the lease's holder becomes the hub that runs the session's commands.
            hold = _workspaces_command("hold", str(self._workspace_ttl), hub_program())
            holder = await conn.create_process(hold, encoding=None)
            said = await asyncio.wait_for(holder.stdout.readline(), 30)
            answer = said.decode(errors="replace").strip()
            shell = await Hub.start(conn, holder) if answer == "leased" else None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            conn.close()
            raise InstanceError(f"could not lease host {host.address}: {exc}") from None
        if shell is None:
            conn.close()
            if answer == "busy":
                return None
            if answer.startswith("refused: "):
                raise InstanceError(
                    f"could not lease host {host.address}: {answer.removeprefix('refused: ')}"
                )
            raise InstanceError(
                f"could not lease host {host.address}: python3 there answered {answer!r} "
                "(the host needs python3)"
            )
        instance = Instance(
            id=host.instance_id,
            gpu_type=host.gpu,
            count=host.count,
            region=REGION,
            price_per_hour=0.0,
            status="running",
            created_at=time.time(),
            labels=dict(labels),
            ip=host.host,
            ssh_port=host.port,
            ssh_user=host.user,
        )
        return _Lease(instance, conn, shell)

    async def _login(self, host: StaticHost) -> asyncssh.SSHClientConnection:
        keys: dict[str, Any] = {}
        if self._client_key is not None:
            keys = {"client_keys": [self._client_key], "agent_path": None}
        try:
            return await asyncssh.connect(
                host.host,
                host.port,
                username=host.user,
                known_hosts=str(self._known_hosts),
                config=[],
                connect_timeout=30,
                encryption_algs=ssh.ENCRYPTION_ALGS,
                keepalive_interval=10,
                keepalive_count_max=3,
                **keys,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise InstanceError(
                f"host {host.address} is not in {self._known_hosts} or presented another key; "
                f"refused to connect (check the host, then: ssh-keyscan -p {host.port} "
                f"{host.host} >> {self._known_hosts})"
            ) from None
        except asyncssh.PermissionDenied:
            raise InstanceError(
                f"host {host.address} refused the login of {host.user} (set --gpu-ssh-key to "
                "a key it accepts)"
            ) from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            raise InstanceError(
                f"could not connect to host {host.address}: {str(exc) or type(exc).__name__}"
            ) from None

    async def workspaces(self, host: StaticHost, *args: str) -> str:
        """The answer of ``host`` to a workspaces command (``list`` or ``remove KEY...``; see
        :mod:`pytest_gpucloud.remote.workspaces`); InstanceError when it cannot answer."""
        conn = await self._login(host)
        try:
            async with conn:
                done = await asyncio.wait_for(conn.run(_workspaces_command(*args)), 60)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            raise InstanceError(f"could not reach host {host.address}: {exc}") from None
        said = str(done.stdout or "").strip()
        if done.exit_status != 0 or not said:
            raise InstanceError(f"host {host.address}: python3 there answered {said!r}")
        return said.splitlines()[-1]

    async def wait_ready(self, instance: Instance, timeout: float) -> Instance:
        return instance

    async def connect(
        self, instance: Instance, session_key: asyncssh.SSHKey, timeout: float
    ) -> asyncssh.SSHClientConnection:
        held = self._leases.get(instance.id)
        if held is None or held.conn.is_closed():
            raise InstanceError(f"the lease of host {instance.id} has ended")
        return held.conn

    def shell(self, instance: Instance) -> Shell:
        held = self._leases.get(instance.id)
        if held is None:
            raise InstanceError(f"the lease of host {instance.id} has ended")
        return held.shell

    async def delete(self, instance_id: str) -> None:
        held = self._leases.pop(instance_id, None)
        if held is not None:
            held.shell.close()
            held.conn.close()


def _workspaces_command(*args: str) -> str:
    words = " ".join(shlex.quote(arg) for arg in args)
    return f"python3 -I -S -c {shlex.quote(source('workspaces'))} {words}"
