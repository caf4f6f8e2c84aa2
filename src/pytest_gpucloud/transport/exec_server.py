"""The one SSH exec server: runs each exec request as a local process, for the simulated
cloud's instances and for the ``local`` provider's slots.

It listens on 127.0.0.1 only, serves exec requests (binary streams; no shell, scp, agent
or X11 forwarding; port forwarding only where a server class allows it, for ``gpu_service``:
see :func:`within_home`), and runs each command as ``/bin/sh -c CMD`` in a process group of its own
with exactly the environment it is given, killed when the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from pytest_gpucloud.core.sshlib import asyncssh

HOST = "127.0.0.1"
_CHUNK = 1 << 16


async def listen_exec(
    server_factory: Callable[[], asyncssh.SSHServer],
    host_key: asyncssh.SSHKey,
    serve: Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]],
) -> asyncssh.SSHAcceptor:
    """An SSH server on 127.0.0.1 (a free port) that only runs exec requests with ``serve``:
    binary streams, no scp, no agent or X11 forwarding."""
    return await asyncssh.listen(
        HOST,
        0,
        server_factory=server_factory,
        server_host_keys=[host_key],
        process_factory=serve,
        encoding=None,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
    )


async def run_exec(
    process: asyncssh.SSHServerProcess[bytes],
    *,
    cwd: Path,
    env: dict[str, str],
    group_ids: list[int],
    on_exit: Callable[[int], None] | None = None,
) -> None:
    """Serve an SSH exec request: run ``/bin/sh -c CMD`` in ``cwd`` with exactly ``env``,
    in a process group of its own (its id added to ``group_ids``), killed when the client
    goes; ``on_exit`` gets the exit status before the client does."""
    assert process.command is not None
    # The output pipes are this function's own, not the subprocess transport's: a child the
    # process left behind can hold them open after it ends, and they must still be closed
    # when serving the request is given up (cancelled).
    pipes: list[tuple[asyncio.StreamReader, asyncio.ReadTransport]] = []
    write_ends: list[int] = []
    try:
        for _ in range(2):
            read_end, write_end = os.pipe()
            write_ends.append(write_end)
            pipes.append(await _read_pipe(read_end))
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            process.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=write_ends[0],
            stderr=write_ends[1],
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        for _, transport in pipes:
            transport.close()
        raise
    finally:
        for write_end in write_ends:
            os.close(write_end)
    group_ids.append(proc.pid)
    assert proc.stdin is not None
    watcher = asyncio.ensure_future(_kill_when_closed(process, proc))
    # Input is copied by hand: asyncssh's redirect to a pipe can lose data when the
    # client's EOF arrives first (asyncio's write pipe transport, Python 3.11).
    pump = asyncio.ensure_future(_pump(process.stdin, proc.stdin))
    # Output too: under backpressure, asyncssh's redirect from a pipe can start a second
    # reader of it, which drops the whole connection. No EOF when stdout ends: it would
    # end stderr too; the exit status closes all.
    outputs = [
        asyncio.ensure_future(_pump_out(reader, sink))
        for (reader, _), sink in zip(pipes, (process.stdout, process.stderr), strict=True)
    ]
    try:
        await asyncio.gather(*outputs)
        status = await proc.wait()
        if on_exit is not None:
            on_exit(status)
        await _report_exit(process, status)
    finally:
        pump.cancel()
        for output in outputs:
            output.cancel()
        for _, transport in pipes:
            transport.close()
        process.close()  # a no-op once the exit status closed it
        await watcher


async def _read_pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.ReadTransport]:
    """A stream reading the pipe ``fd`` (which it owns from now on), with its transport."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_CHUNK, loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(fd, "rb", 0)
    )
    return reader, transport


async def _pump(source: asyncssh.SSHReader[bytes], stdin: asyncio.StreamWriter) -> None:
    """Copy the client's input to the process until EOF or until it stops reading."""
    with contextlib.suppress(ConnectionError, asyncssh.Error):
        while data := await source.read(_CHUNK):
            stdin.write(data)
            await stdin.drain()
    stdin.close()


async def _pump_out(source: asyncio.StreamReader, sink: asyncssh.SSHWriter[bytes]) -> None:
    """Copy the process's output to the client until EOF or until the client is gone."""
    with contextlib.suppress(ConnectionError, asyncssh.Error):
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()


async def _report_exit(process: asyncssh.SSHServerProcess[bytes], status: int) -> None:
    """Send the rest of the output, then the exit status (or signal), if the client is there."""
    try:
        await process.stdout.drain()
        await process.stderr.drain()
    except (OSError, asyncssh.Error):
        return
    if status >= 0:
        process.exit(status)
    else:
        process.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))


async def _kill_when_closed(
    process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process
) -> None:
    """The client went away (or the process ended): kill what is left of it."""
    await process.wait_closed()
    if proc.returncode is None:
        kill_group(proc.pid)


def kill_group(group_id: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group_id, signal.SIGKILL)


def within_home(path: str, home: Path) -> bool:
    """Whether ``path`` is inside ``home``: where a forward to a Unix socket may go."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(home))
