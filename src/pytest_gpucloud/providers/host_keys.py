"""Host keys made on this machine for the ``inject`` policy."""

from __future__ import annotations

from dataclasses import dataclass

from pytest_gpucloud.core.sshlib import asyncssh


@dataclass(frozen=True)
class InjectedHostKey:
    """An ed25519 host key for one instance: the private half goes onto it with the create
    call, the public half is pinned before the first connection."""

    private_openssh: str
    public_line: str

    @classmethod
    def new(cls) -> InjectedHostKey:
        key = asyncssh.generate_private_key("ssh-ed25519")
        return cls(
            key.export_private_key("openssh").decode(),
            key.export_public_key("openssh").decode().strip(),
        )
