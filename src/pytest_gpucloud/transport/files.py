"""Files to and from an instance in one remote command: the local end of ``remote/filepipe.py``.

:func:`pull` brings a remote file or folder home and treats the instance as untrusted: the
stream is unpacked by :func:`~pytest_gpucloud.remote.filepipe.extract`, which refuses
absolute paths, ``..``, links and anything that is not a plain file, and stops at the byte
limit. :func:`push` sends a local file or folder up. Both stream: nothing is held in memory
whole, and unpacking runs in a worker thread while the event loop reads the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_gpucloud.core.errors import InstanceError
from pytest_gpucloud.core.escape import visible
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.remote import filepipe, source
from pytest_gpucloud.transport.commands import Ended, Process, Shell

if TYPE_CHECKING:
    from collections.abc import Iterator

_CHUNK = 1 << 20
_LISTED_MAX = 1000  # names kept of what an instance says it left behind or skipped


@dataclass
class Pulled:
    """What one :func:`pull` brought home.

    ``kind``: what the remote path was (``dir``, ``file`` or ``missing``). ``left``:
    ``(name, size)`` of the files over the byte limit, left on the instance. ``skipped``:
    links and special files there, never sent. ``refused``: members of the stream that were
    not written here, with the reason (a well-behaved instance sends none).
    """

    kind: str
    files: int = 0
    bytes: int = 0
    left: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def _command(*args: str) -> str:
    return shlex.join(["python3", "-I", "-S", "-c", source("filepipe"), *args])


async def pull(
    shell: Shell,
    remote_path: str,
    local_dir: Path,
    *,
    max_bytes: int | None = None,
) -> Pulled:
    """Copy the remote file or folder ``remote_path`` into ``local_dir`` (made if need be).

    A folder's files keep their paths below it; a file lands as ``local_dir/<its name>``.
    Files past ``max_bytes`` stay behind (listed in :attr:`Pulled.left`). Raises
    :class:`InstanceError` when the instance cannot be reached or sends a broken stream.
    """
    limit = -1 if max_bytes is None else max_bytes
    command = _command("send", remote_path, str(limit))
    result = await _receive(shell, command, local_dir, max_bytes, remote_path)
    control: dict[str, Any] = result["control"]
    try:
        return Pulled(
            kind=str(control.get("kind", "")),
            files=result["files"],
            bytes=result["bytes"],
            left=[(str(name), int(size)) for name, size in control["left"][:_LISTED_MAX]],
            skipped=[(str(name), str(why)) for name, why in control["skipped"][:_LISTED_MAX]],
            refused=[(str(name), str(why)) for name, why in result["refused"]],
        )
    except (KeyError, TypeError, ValueError):
        raise InstanceError(
            f"copying {remote_path} from the instance failed: a garbled control line"
        ) from None


async def pull_listed(
    shell: Shell,
    folder: str,
    local_dir: Path,
    listed: list[tuple[str, int]],
    *,
    max_bytes: int | None = None,
) -> Pulled:
    """:func:`pull` the remote ``folder`` whose regular files are ``listed`` (name, size; as
    its owner, the worker, found them), through the instance's own ``tar``: no Python to
    start there, which is most of the cost of a folder of small files. Where the instance
    has no ``tar``, or it fails (a file changed meanwhile), as :func:`pull` does."""
    chosen, over = filepipe.choose([(name, "", size, 0, 0.0) for name, size in listed], max_bytes)
    left = [(str(name), int(size)) for name, size in over]
    if not chosen:
        return Pulled("dir", left=left)
    names = b"".join(b"./" + f[0].encode("utf-8", "surrogateescape") + b"\0" for f in chosen)
    command = f"tar -c -f - -C {shlex.quote(folder)} --null -T -"
    try:
        result = await _receive(shell, command, local_dir, max_bytes, folder, tar=True, stdin=names)
    except InstanceError:
        return await pull(shell, folder, local_dir, max_bytes=max_bytes)
    return Pulled(
        kind="dir",
        files=result["files"],
        bytes=result["bytes"],
        left=left,
        refused=[(str(name), str(why)) for name, why in result["refused"]],
    )


async def _receive(
    shell: Shell,
    command: str,
    local_dir: Path,
    max_bytes: int | None,
    what: str,
    *,
    tar: bool = False,
    stdin: bytes = b"",
) -> dict[str, Any]:
    """Run ``command`` and unpack what it prints into ``local_dir`` (in a worker thread
    while the event loop reads the channel); :class:`InstanceError` if that fails."""
    failed = f"copying {what} from the instance failed"
    try:
        proc = await shell.create_process(command)
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"{failed}: {exc}") from None
    loop = asyncio.get_running_loop()
    # Reads of a whole buffer or more bypass the reader's own buffer: file content is
    # copied once, from the channel into the buffer the file is written from.
    reader = io.BufferedReader(_ChannelReader(proc.stdout, loop), _CHUNK // 4)
    try:
        proc.stdin.write(stdin)
        proc.stdin.write_eof()
        result: dict[str, Any] = await asyncio.to_thread(
            filepipe.extract, reader, str(local_dir), max_bytes, tar=tar, private=True
        )
        await _drain(proc)
    except filepipe.PipeRefused as exc:
        raise InstanceError(f"{failed}: {await _why(proc) or exc}") from None
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"{failed}: {exc}") from None
    finally:
        proc.close()
    if proc.exit_status not in (0, None):
        raise InstanceError(f"{failed}: {await _why(proc) or f'exit status {proc.exit_status}'}")
    return result


async def push(shell: Shell, local_path: Path, remote_path: str) -> int:
    """Copy the local file or folder ``local_path`` to ``remote_path`` on the instance.

    A file becomes the file ``remote_path`` (folders made); a folder's files land below the
    folder ``remote_path``, over files of the same name. Links and special files are not
    sent. Returns the number of files sent; raises :class:`InstanceError` on failure.
    """
    kind, files, _ = await asyncio.to_thread(filepipe.walk, str(local_path))
    if kind == "missing":
        raise FileNotFoundError(f"{local_path}: no such file or folder")
    target = remote_path.rstrip("/") or "/"
    if kind == "file":
        head, _, name = target.rpartition("/")
        target = head or ("/" if target.startswith("/") else ".")
        files = [(name, *files[0][1:])]
    failed = f"copying {local_path} to {remote_path} on the instance failed"
    try:
        proc = await shell.create_process(_command("recv", target))
        await _send(proc.stdin, filepipe.chunks({"kind": kind}, files))
        done = await _finish(proc)
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"{failed}: {exc}") from None
    if done.exit_status != 0:
        raise InstanceError(f"{failed}: {_stderr(done) or done.stdout!r}")
    return len(files)


async def _send(stdin: asyncssh.SSHWriter[bytes], chunks: Iterator[bytes]) -> None:
    """Write ``chunks`` (read from disk in a worker thread, one ahead), then EOF."""
    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
    while (chunk := await pending) is not None:
        pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
        stdin.write(chunk)
        await stdin.drain()
    stdin.write_eof()


async def _finish(proc: Process) -> Ended:
    try:
        return await asyncio.wait_for(proc.wait(), 10)
    except asyncio.TimeoutError:
        proc.close()
        raise InstanceError("the instance's end of a file copy did not finish") from None


async def _drain(proc: Process) -> None:
    """Read the rest of the stream (its end-of-archive padding) and let the sender exit:
    an SSH server may take a channel closed under a running command badly."""

    async def rest() -> None:
        left = _CHUNK
        while left > 0 and (data := await proc.stdout.read(left)):
            left -= len(data)
        await proc.wait_closed()

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(rest(), 10)


async def _why(proc: Process) -> str:
    """The last line the remote end wrote to stderr, if it ends within a moment."""
    try:
        await asyncio.wait_for(proc.wait_closed(), 2)
        err = await asyncio.wait_for(proc.stderr.read(), 2)
    except (asyncio.TimeoutError, OSError, asyncssh.Error):
        return ""
    lines = visible(err.decode(errors="replace")).strip().splitlines()
    return lines[-1] if lines else ""


def _stderr(done: Ended) -> str:
    err = done.stderr
    text = err.decode(errors="replace") if isinstance(err, bytes) else str(err or "")
    lines = visible(text).strip().splitlines()
    return lines[-1] if lines else ""


class _ChannelReader(io.RawIOBase):
    """An SSH channel's output as a blocking file, for a worker thread (not the loop's).

    Each read waits for a whole buffer (or the end): one hop between the threads per MiB,
    not per SSH packet; the channel's window keeps data coming meanwhile.
    """

    def __init__(self, stream: asyncssh.SSHReader[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        return asyncio.run_coroutine_threadsafe(self._fill(view), self._loop).result()

    async def _fill(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view) and (data := await self._stream.read(len(view) - filled)):
            view[filled : filled + len(data)] = data
            filled += len(data)
        return filled
