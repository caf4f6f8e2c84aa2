"""A sim instance's machine: a real SSH server on 127.0.0.1 that runs commands as processes.

Each machine has its own ed25519 host key (or the one injected at create) and its own home
directory. It accepts only public-key auth as its user (``gpu`` unless a dialect names the
vendor's) with the key given at create, and runs each exec request as
``/bin/sh -c CMD`` in a process group of its own, with a minimal environment of its own
(never the sim's: it may hold an API key; environment sent by the client is ignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.core.wire import SimCommandRecord
from pytest_gpucloud.transport.exec_server import (
    HOST,
    kill_group,
    listen_exec,
    run_exec,
    within_home,
)

SSH_USER = "gpu"
SSH_HOST = HOST
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _Command:
    command: str
    env: dict[str, str]
    started_at: datetime = field(default_factory=utcnow)
    ended_at: datetime | None = None
    exit_status: int | None = None

    def record(self) -> SimCommandRecord:
        return SimCommandRecord(**asdict(self))


class _SshServer(asyncssh.SSHServer):
    """Per-connection callbacks: track the connection, check user and key."""

    def __init__(self, machine: SimMachine) -> None:
        self._machine = machine
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._machine.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._machine.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        machine = self._machine
        return username == machine.user and key.public_data == machine.client_key.public_data

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        """Port forwarding as sshd allows it, to the instance's own loopback only (a sim
        instance's neighbours are this machine's other processes)."""
        return dest_host in LOOPBACK

    def unix_connection_requested(self, dest_path: str) -> bool:
        """Forwarding to a Unix socket, in the instance's own home only."""
        return self._machine.socket_forwarding and within_home(dest_path, self._machine.home)


class SimMachine:
    """The SSH side of one instance, from boot to termination."""

    def __init__(
        self,
        instance_id: str,
        gpu: str,
        client_key: asyncssh.SSHKey,
        extra_path: str | None,
        *,
        user: str = SSH_USER,
        host_key: asyncssh.SSHKey | None = None,
    ) -> None:
        self.client_key = client_key
        self.user = user
        self.host_key = host_key or asyncssh.generate_private_key("ssh-ed25519")
        self.home = Path(tempfile.mkdtemp(prefix=f"gpucloud-sim-{instance_id}-"))
        (self.home / "tmp").mkdir()  # the instance's own temporary directory (TMPDIR)
        self.env = _environment(instance_id, gpu, self.home, extra_path)
        self.commands: list[_Command] = []
        self.socket_forwarding = True  # off: as sshd with AllowStreamLocalForwarding no
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self._group_ids: list[int] = []
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._refuser: socket.socket | None = None
        self._drops: dict[int, float] = {}  # command number -> delay of the drop it starts
        self._timers: list[asyncio.TimerHandle] = []

    @property
    def host_key_text(self) -> str:
        return self.host_key.export_public_key().decode().strip()

    async def listen(self) -> int:
        """Start the SSH server; return its port."""
        self._acceptor = await listen_exec(lambda: _SshServer(self), self.host_key, self._serve)
        return self._acceptor.get_port()

    def refuse(self) -> int:
        """Hold a port where nothing listens (connections are refused); return it."""
        self._refuser = socket.socket()
        self._refuser.bind((SSH_HOST, 0))
        port: int = self._refuser.getsockname()[1]
        return port

    def drop_after(self, after_s: float | None, after_commands: int | None) -> None:
        """Abort every connection ``after_s`` after now or after the n-th command starts."""
        if after_commands is None:
            self._schedule_drop(after_s or 0.0)
        else:
            self._drops[after_commands] = after_s or 0.0

    def drop_connections(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    def stop(self) -> None:
        """Close the server and its connections, kill every process group, remove home."""
        for timer in self._timers:
            timer.cancel()
        if self._acceptor is not None:
            self._acceptor.close()
        if self._refuser is not None:
            self._refuser.close()
        self.drop_connections()
        for group_id in self._group_ids:
            kill_group(group_id)
        # Not in a worker thread: stop() also runs at interpreter exit, executors gone.
        shutil.rmtree(self.home, ignore_errors=True)

    def _schedule_drop(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(delay, self.drop_connections))

    def _command_started(self, command: str) -> _Command:
        record = _Command(command, dict(self.env))
        self.commands.append(record)
        delay = self._drops.pop(len(self.commands), None)
        if delay is not None:
            self._schedule_drop(delay)
        return record

    async def _serve(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.command is None:
            process.stderr.write(b"this instance runs commands only (no shell)\n")
            process.exit(1)
            return
        record = self._command_started(process.command)

        def ended(status: int) -> None:
            record.exit_status = status
            record.ended_at = utcnow()

        await run_exec(
            process, cwd=self.home, env=self.env, group_ids=self._group_ids, on_exit=ended
        )


def _environment(instance_id: str, gpu: str, home: Path, extra_path: str | None) -> dict[str, str]:
    dirs = [extra_path] if extra_path else []
    dirs += [os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]
    return {
        "PATH": os.pathsep.join(dict.fromkeys(dirs)),
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "LANG": "C.UTF-8",
        "GPUCLOUD_SIM_INSTANCE": instance_id,
        "GPUCLOUD_SIM_GPU": gpu,
    }
