"""The hub that runs a session's commands over one exec (``transport/commands.py``,
``remote/hub.py``), against a sim instance over real SSH."""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh

from pytest_gpucloud.transport.commands import Hub, Process, hub_program
from tests.cloud import Sim, SimHost


@asynccontextmanager
async def _login(
    host: SimHost, key: asyncssh.SSHKey
) -> AsyncIterator[asyncssh.SSHClientConnection]:
    async with asyncssh.connect(
        "127.0.0.1",
        host.port,
        username="gpu",
        client_keys=[key],
        known_hosts=([asyncssh.import_public_key(host.host_key)], [], []),
        agent_path=None,
        config=[],
    ) as conn:
        yield conn


def _on_a_host(
    sim: Sim, scenario: Callable[[asyncssh.SSHClientConnection, SimHost], Awaitable[None]]
) -> SimHost:
    key = asyncssh.generate_private_key("ssh-ed25519")
    host = sim.static_host("T4", key)

    async def main() -> None:
        async with _login(host, key) as conn:
            await scenario(conn, host)

    try:
        asyncio.run(main())
    finally:
        sim.delete(host.id)
    return host


async def _hub(conn: asyncssh.SSHClientConnection) -> Hub:
    hub = await Hub.start(conn)
    assert isinstance(hub, Hub)
    return hub


def _hub_sockets(host: SimHost) -> list[Path]:
    """The hubs' sockets on ``host``: in its temporary directory (the sim's TMPDIR)."""
    return list((host.home / "tmp").glob("gpucloud-hub-*/s"))


def _commands(sim: Sim, host: SimHost) -> list[str]:
    return [c["command"] for i in sim.instances() if i["id"] == host.id for c in i["commands"]]


def test_hub_commands_have_their_streams_and_exit_status_over_one_exec(sim: Sim) -> None:
    async def scenario(conn: asyncssh.SSHClientConnection, host: SimHost) -> None:
        hub = await _hub(conn)
        done = await (await hub.create_process("echo out; echo err >&2; pwd; exit 3")).wait()
        assert (done.exit_status, done.stdout, done.stderr) == (
            3,
            f"out\n{host.home}\n".encode(),
            b"err\n",
        )
        cat = await hub.create_process("cat; echo done >&2")
        cat.stdin.write(b"x" * 300_000)
        cat.stdin.write_eof()
        done = await cat.wait()
        assert isinstance(done.stdout, bytes)
        assert (done.exit_status, len(done.stdout), done.stderr) == (0, 300_000, b"done\n")
        assert hub.served

    host = _on_a_host(sim, scenario)
    assert len(_commands(sim, host)) == 1, "one exec: the hub's"


def test_closing_a_hub_command_kills_it_and_its_children(sim: Sim) -> None:
    async def scenario(conn: asyncssh.SSHClientConnection, host: SimHost) -> None:
        hub = await _hub(conn)
        sleeper = await hub.create_process("sleep 60 & echo $!; wait")
        pid = int(await sleeper.stdout.readline())
        sleeper.close()
        await asyncio.wait_for(sleeper.wait_closed(), 5)
        assert sleeper.exit_signal is not None
        assert sleeper.exit_signal[0] == "KILL"
        await _gone(pid)

    _on_a_host(sim, scenario)


def test_the_end_of_the_hub_kills_what_it_runs(sim: Sim) -> None:
    async def scenario(conn: asyncssh.SSHClientConnection, host: SimHost) -> None:
        command = f"python3 -I -S -c {shlex.quote(hub_program())}"
        process = await conn.create_process(command, encoding=None)
        hub = await Hub.start(conn, process)
        assert isinstance(hub, Hub)
        sleeper = await hub.create_process("echo $$; exec sleep 60")
        pid = int(await sleeper.stdout.readline())
        [socket_path] = _hub_sockets(host)
        process.stdin.write_eof()  # as the connection's loss does on OpenSSH
        await _gone(pid)
        await asyncio.wait_for(sleeper.wait_closed(), 5)
        await _eventually(lambda: not socket_path.parent.exists(), "the hub's folder removed")

    _on_a_host(sim, scenario)


def test_a_connection_to_the_hub_without_its_token_runs_nothing(sim: Sim, tmp_path: Path) -> None:
    """Another process of the machine that finds the socket cannot run commands through it."""
    marker = tmp_path / "ran"

    async def scenario(conn: asyncssh.SSHClientConnection, host: SimHost) -> None:
        hub = await _hub(conn)
        assert (await (await hub.create_process("true")).wait()).exit_status == 0
        [path] = _hub_sockets(host)
        assert path.parent.stat().st_mode & 0o777 == 0o700
        for token in ("guessed", ""):
            request = {"token": token, "id": 99, "command": f"touch {marker}"}
            with socket.socket(socket.AF_UNIX) as intruder:
                intruder.connect(str(path))
                intruder.sendall(json.dumps(request).encode() + b"\n")
                assert intruder.recv(10) == b"", "closed without running anything"
        assert not marker.exists()

    _on_a_host(sim, scenario)


def test_unread_stderr_of_a_hub_command_is_kept_within_a_bound(sim: Sim) -> None:
    """A command that floods stderr while nobody reads it (a hostile instance) costs at
    most the bound here; its last output is what stays."""

    async def scenario(conn: asyncssh.SSHClientConnection, host: SimHost) -> None:
        hub = await _hub(conn)
        flood = await hub.create_process("head -c 20000000 /dev/zero >&2; echo end >&2")
        done = await flood.wait()
        assert isinstance(done.stderr, bytes)
        assert done.stderr.endswith(b"\0end\n")
        assert len(done.stderr) <= (1 << 20) + (1 << 16)

    _on_a_host(sim, scenario)


def test_a_server_that_forwards_to_no_socket_gets_an_exec_per_command(sim: Sim) -> None:
    sim.fault(kind="no_socket_forwarding")

    async def scenario(conn: asyncssh.SSHClientConnection, host: SimHost) -> None:
        hub = await _hub(conn)
        first: Process = await hub.create_process("echo one")
        assert (await first.wait()).stdout == b"one\n"
        assert not hub.served

    host = _on_a_host(sim, scenario)
    assert [c.split()[0] for c in _commands(sim, host)] == ["python3", "echo"]


async def _gone(pid: int) -> None:
    await _eventually(lambda: not _alive(pid), f"process {pid} ended")


async def _eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, f"not yet: {what}"
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
