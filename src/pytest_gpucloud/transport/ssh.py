"""SSH to instances: an in-memory ed25519 key per session, the host key pinned.

No agent, no ``~/.ssh/config``, no known_hosts file: the only trusted host key is the one
the provider announced (or injected) for the instance; under the ``tofu`` policy, the one the
first connection saw (:func:`presented_host_key`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from pytest_gpucloud.core.errors import HostKeyMismatch, InstanceError
from pytest_gpucloud.core.sshlib import asyncssh

# AES-GCM first: one AES-NI call per packet where asyncssh's chacha20-poly1305 makes
# several (bench/results.md has the measurement); the rest as asyncssh orders them.
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
ENCRYPTION_ALGS += [
    alg.decode()
    for alg in asyncssh.encryption.get_default_encryption_algs()
    if alg.decode() not in ENCRYPTION_ALGS
]


class Endpoint(Protocol):
    """Where an instance is reached over SSH (a provider's ``Instance`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def ssh_port(self) -> int | None: ...
    @property
    def ssh_user(self) -> str | None: ...
    @property
    def ssh_host_key(self) -> str | None: ...
    @property
    def trust_first_host_key(self) -> bool: ...


def new_client_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519", comment="pytest-gpucloud")


def public_key_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().strip()


async def connect(
    instance: Endpoint,
    key: asyncssh.SSHKey,
    *,
    timeout: float,
    keepalive_s: float = 10.0,
) -> asyncssh.SSHClientConnection:
    """Connect to a running instance, retrying refusals (sshd starting) until ``timeout``."""
    trust_first = instance.ssh_host_key is None and instance.trust_first_host_key
    if not (instance.ip and instance.ssh_port and instance.ssh_user) or not (
        instance.ssh_host_key or trust_first
    ):
        raise InstanceError(f"instance {instance.id} has no SSH endpoint yet")
    known_hosts: tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]] | None
    known_hosts = None if trust_first else ([_host_key(instance)], [], [])
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return await asyncssh.connect(
                instance.ip,
                instance.ssh_port,
                username=instance.ssh_user,
                client_keys=[key],
                known_hosts=known_hosts,
                agent_path=None,
                agent_forwarding=False,
                config=[],
                connect_timeout=max(1.0, min(15.0, deadline - time.monotonic())),
                encryption_algs=ENCRYPTION_ALGS,
                keepalive_interval=keepalive_s,
                keepalive_count_max=3,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise HostKeyMismatch(
                f"instance {instance.id} ({instance.ip}:{instance.ssh_port}) presented an SSH "
                "host key that differs from the one announced or injected; refused to connect"
            ) from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise InstanceError(
                    f"could not connect over SSH to instance {instance.id} "
                    f"({instance.ip}:{instance.ssh_port}): {_reason(exc)}"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def presented_host_key(conn: asyncssh.SSHClientConnection) -> str:
    """The host key the server of ``conn`` presented, as an OpenSSH line: what the ``tofu``
    policy pins after the first connection, so that later ones refuse any other."""
    seen = conn.get_server_host_key()
    if seen is None:  # pragma: no cover - every SSH server presents a host key
        raise InstanceError("the SSH server presented no host key")
    return seen.export_public_key().decode().strip()


def _host_key(instance: Endpoint) -> asyncssh.SSHKey:
    assert instance.ssh_host_key is not None
    try:
        return asyncssh.import_public_key(instance.ssh_host_key)
    except (asyncssh.KeyImportError, ValueError):
        raise InstanceError(
            f"instance {instance.id}: the API announced an SSH host key that cannot be read"
        ) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
