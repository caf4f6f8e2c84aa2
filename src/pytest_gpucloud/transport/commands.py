"""How the session's commands reach an instance: each one its own SSH exec, or all of them
through one hub.

OpenSSH starts the user's login shell for every exec, which a ``.bashrc`` that runs
``pyenv init`` makes cost 0.1-0.5 s. :class:`Hub` pays it once: one exec starts
:mod:`pytest_gpucloud.remote.hub` on the machine, and every later command is an SSH
``direct-streamlocal`` channel to that hub's Unix socket, which runs it (no shell but
``/bin/sh``). Where the server forbids forwarding to sockets, or the hub cannot listen, the
commands fall back to an exec each (:class:`ExecShell`). Either way a command is a
:class:`Process`: stdin and stdout as streams, stderr, and how it ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import secrets
import shlex
import signal
from dataclasses import dataclass
from typing import Protocol, cast

from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.remote import source

HUB_START_TIMEOUT_S = 30.0
_EVENT_MAX = 1 << 20  # one event line of the hub: a chunk of stderr (64 KiB) as JSON
_STDERR_KEPT = 1 << 20  # unread stderr of a hub's command beyond this is dropped (oldest)
_CHUNK = 1 << 16

ExitSignal = tuple[str, bool, str, str]  # asyncssh's form: name, core dumped, message, lang


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Ended(Protocol):
    """How a command ended, with the output nobody had read."""

    @property
    def exit_status(self) -> int | None: ...
    @property
    def stdout(self) -> bytes | str | None: ...
    @property
    def stderr(self) -> bytes | str | None: ...


class Process(Protocol):
    """A running command (an asyncssh exec process is one)."""

    @property
    def stdin(self) -> asyncssh.SSHWriter[bytes]: ...
    @property
    def stdout(self) -> asyncssh.SSHReader[bytes]: ...
    @property
    def stderr(self) -> ByteReader: ...
    @property
    def exit_status(self) -> int | None: ...
    @property
    def exit_signal(self) -> ExitSignal | None: ...
    async def wait(self) -> Ended: ...
    async def wait_closed(self) -> None: ...
    def close(self) -> None: ...


class Shell(Protocol):
    """Where a machine's commands start."""

    async def create_process(self, command: str) -> Process: ...


@dataclass(frozen=True)
class ExecShell:
    """Each command its own SSH exec (one login shell each on OpenSSH)."""

    conn: asyncssh.SSHClientConnection

    async def create_process(self, command: str) -> Process:
        return await self.conn.create_process(command, encoding=None)


@dataclass(frozen=True)
class _Completed:
    exit_status: int | None
    stdout: bytes
    stderr: bytes


class _Tail:
    """A hub command's stderr as it arrives; keeps the last :data:`_STDERR_KEPT` bytes that
    were not read yet."""

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ended = False
        self._arrived = asyncio.Event()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size > _STDERR_KEPT and len(self._chunks) > 1:
            self._size -= len(self._chunks.popleft())
        self._arrived.set()

    def end(self) -> None:
        self._ended = True
        self._arrived.set()

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes as they come (for -1: all, at the end); b"" at the end."""
        while not self._ended and (n < 0 or not self._chunks):
            self._arrived.clear()
            await self._arrived.wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if 0 <= n < len(data):
            self._chunks.append(data[n:])
            self._size = len(data) - n
            data = data[:n]
        return data


class HubProcess:
    """A command run by a :class:`Hub`: its channel is stdin and stdout, the hub reports its
    stderr and exit status."""

    def __init__(
        self,
        hub: Hub,
        number: int,
        stdin: asyncssh.SSHWriter[bytes],
        stdout: asyncssh.SSHReader[bytes],
    ) -> None:
        self._hub = hub
        self._number = number
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = _Tail()
        self.exit_status: int | None = None
        self.exit_signal: ExitSignal | None = None
        self._ended = asyncio.Event()

    def ended(self, status: int | None) -> None:
        """The hub reported the exit (``status`` < 0: a signal), or ended itself (None)."""
        if status is not None and status < 0:
            try:
                name = signal.Signals(-status).name.removeprefix("SIG")
            except ValueError:
                name = str(-status)
            self.exit_signal = (name, False, "", "")
        else:
            self.exit_status = status
        self.stderr.end()
        self._ended.set()

    async def wait(self) -> Ended:
        out = await self.stdout.read()
        await self._ended.wait()
        return _Completed(self.exit_status, out, await self.stderr.read())

    async def wait_closed(self) -> None:
        await self._ended.wait()

    def close(self) -> None:
        """Close the channel and kill the command if it still runs."""
        self.stdin.close()
        if not self._ended.is_set():
            self._hub.kill(self._number)


def hub_program() -> str:
    """The hub's Python program (``python3 -I -S -c`` runs it)."""
    return source("hub")


class Hub:
    """The machine's hub (:mod:`pytest_gpucloud.remote.hub`) over one SSH connection.

    It starts while the session goes on: the first command waits for its socket (up to
    :data:`HUB_START_TIMEOUT_S`), and runs as an exec, as all later ones, where it has none
    or the server forbids forwarding to sockets.
    """

    def __init__(
        self, conn: asyncssh.SSHClientConnection, process: asyncssh.SSHClientProcess[bytes]
    ) -> None:
        self._conn = conn
        self._process = process
        self._token = secrets.token_hex(16)
        process.stdin.write(self._token.encode() + b"\n")
        self._path: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._numbers = itertools.count(1)
        self._running: dict[int, HubProcess] = {}
        self._fallback: ExecShell | None = None
        self._events = asyncio.ensure_future(self._read_events())

    @classmethod
    async def start(
        cls,
        conn: asyncssh.SSHClientConnection,
        process: asyncssh.SSHClientProcess[bytes] | None = None,
    ) -> Hub:
        """A hub on the machine of ``conn``, started by an exec of its own or by ``process``,
        an exec that becomes one (the lease's ``hold``, given :func:`hub_program`, which
        goes on holding the lease where the hub cannot listen). SSH trouble raises."""
        if process is None:
            command = f"python3 -I -S -c {shlex.quote(hub_program())}"
            process = await conn.create_process(command, encoding=None)
        return cls(conn, process)

    @property
    def served(self) -> bool:
        """Whether commands go through the hub (not one exec each)."""
        return self._fallback is None and not self._events.done()

    async def create_process(self, command: str) -> Process:
        if self._fallback is None:
            path = await self._socket()
            channel = None
            if path is not None:
                with contextlib.suppress(asyncssh.ChannelOpenError):  # forbidden by the server
                    channel = await self._conn.open_unix_connection(path)
            if channel is None:
                self._fallback = ExecShell(self._conn)
            else:
                reader, writer = cast(
                    "tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]", channel
                )
                number = next(self._numbers)
                process = self._running[number] = HubProcess(self, number, writer, reader)
                request = {"token": self._token, "id": number, "command": command}
                writer.write(json.dumps(request).encode() + b"\n")
                if self._events.done():  # the hub is gone: nothing will report the end
                    process.ended(None)
                return process
        return await self._fallback.create_process(command)

    async def _socket(self) -> str | None:
        """The hub's socket, once it listens; None: it will not."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._path), HUB_START_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None

    def kill(self, number: int) -> None:
        if not self._process.stdin.is_closing():
            self._process.stdin.write(f"kill {number}\n".encode())

    def close(self) -> None:
        """End the hub, which kills what it still runs (and, on a static host, ends the
        lease it holds)."""
        self._process.close()

    async def _read_events(self) -> None:
        """Hand the hub's reports to their commands; when the hub ends (or garbles one), the
        commands still running have ended too."""
        buffered = b""
        try:
            head = await self._process.stdout.readline()
            said, _, path = head.decode(errors="replace").strip().partition(" ")
            listens = said == "hub" and path.startswith("/")
            self._path.set_result(path if listens else None)
            while listens and (chunk := await self._process.stdout.read(_CHUNK)):
                *lines, buffered = (buffered + chunk).split(b"\n")
                if len(buffered) > _EVENT_MAX:
                    return
                for line in lines:
                    self._dispatch(json.loads(line))
        except (OSError, asyncssh.Error, ValueError, KeyError, TypeError):
            return
        finally:
            if not self._path.done():
                self._path.set_result(None)
            for process in self._running.values():
                process.ended(None)
            self._running.clear()

    def _dispatch(self, event: dict[str, object]) -> None:
        number = event["id"]
        if not isinstance(number, int) or (process := self._running.get(number)) is None:
            return
        if isinstance(err := event.get("err"), str):
            process.stderr.feed(err.encode("latin-1"))
        elif isinstance(status := event.get("exit"), int):
            del self._running[number]
            process.ended(status)
