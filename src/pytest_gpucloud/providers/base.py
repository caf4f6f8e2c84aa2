"""The provider protocol: what the fleet needs from a cloud (or a rack, or this machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pytest_gpucloud.core.catalog import GpuType, Offer

if TYPE_CHECKING:
    import asyncssh

    from pytest_gpucloud.transport.commands import Shell


@dataclass(frozen=True)
class Instance:
    """A machine as the provider last described it.

    ``ssh_host_key`` is the OpenSSH public host key the provider announced (or injected);
    the SSH transport refuses any other. Without one, ``trust_first_host_key`` (policy
    ``tofu``) lets the first connection pin the key the machine presents.
    """

    id: str
    gpu_type: str
    count: int
    region: str
    price_per_hour: float
    status: str
    created_at: float
    labels: dict[str, str] = field(default_factory=dict)
    ip: str | None = None
    ssh_port: int | None = None
    ssh_user: str | None = None
    ssh_host_key: str | None = None
    trust_first_host_key: bool = False


class Provider(Protocol):
    """A source of GPU machines.

    Errors are those of :mod:`pytest_gpucloud.core.errors`: ``OutOfCapacity``, ``RateLimited``,
    ``AuthError``, ``InvalidRequest``, ``Transient``, ``NotFound``, ``BadAnswer``.
    """

    name: str
    #: True where "GPU" tests really run on this machine's CPU (the simulated cloud).
    simulated: bool

    async def catalog(self) -> list[GpuType]: ...

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
    ) -> Instance: ...

    async def wait_ready(self, instance: Instance, timeout: float) -> Instance:
        """Poll until the instance is ``running`` with an SSH endpoint."""
        ...

    async def delete(self, instance_id: str) -> None:
        """Delete; idempotent: an instance that is already gone counts as deleted."""
        ...

    async def get(self, instance_id: str) -> Instance: ...

    async def list_instances(self, labels: dict[str, str]) -> list[Instance]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LeasingProvider(Protocol):
    """A provider whose machines outlive the session (this machine's GPUs, static hosts).

    Its ``create`` leases a free machine (waiting a bounded while for one) and ``delete``
    ends the lease; nothing is created or destroyed. It logs in with credentials of its
    own, through :meth:`connect`, and the launcher removes the session's workspace before
    the lease ends.
    """

    async def connect(
        self, instance: Instance, session_key: asyncssh.SSHKey, timeout: float
    ) -> asyncssh.SSHClientConnection:
        """An SSH connection to the leased machine ``instance``."""
        ...


@runtime_checkable
class HasShell(Protocol):
    """A leasing provider whose leases run commands through a shell of their own (the
    ``ssh`` provider's hub, started with the lease: the login shell paid once). The machine
    starts its commands there instead of an exec each."""

    def shell(self, instance: Instance) -> Shell:
        """Where the commands on the leased machine ``instance`` start."""
        ...


@runtime_checkable
class KeyKeeper(Protocol):
    """A provider that registers the session's SSH key on the account (Lambda): ``cleanup``
    deletes the keys that dead sessions left."""

    async def delete_stale_keys(self, now: float) -> list[str]:
        """Delete the keys of sessions past their expiry that no instance uses; their names."""
        ...
