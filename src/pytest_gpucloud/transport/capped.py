"""Commands on an instance whose output is read with a bound: an instance may print forever.

:func:`run_capped` keeps at most ``max_bytes`` of each of stdout and stderr, the last ones,
and says whether it dropped any (``Captured.cut``): a caller that needs the whole output
refuses it then, one that shows a tail (a setup log) keeps the tail.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pytest_gpucloud.transport.commands import ByteReader, Shell

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Captured:
    """How a command ended, and the last ``max_bytes`` of each stream."""

    stdout: bytes
    stderr: bytes
    exit_status: int | None
    exit_signal: str | None
    cut: bool  # some output was dropped to stay within the bound


async def run_capped(
    shell: Shell,
    command: str,
    *,
    max_bytes: int,
    stdin: bytes | None = None,
) -> Captured:
    """Run ``command`` to its end, reading its output within ``max_bytes`` per stream."""
    process = await shell.create_process(command)
    try:
        if stdin:
            process.stdin.write(stdin)
        process.stdin.write_eof()
        (out, out_cut), (err, err_cut) = await asyncio.gather(
            _tail(process.stdout, max_bytes), _tail(process.stderr, max_bytes)
        )
        await process.wait_closed()
    finally:
        process.close()
    signal = process.exit_signal[0] if process.exit_signal is not None else None
    return Captured(out, err, process.exit_status, signal, out_cut or err_cut)


async def _tail(stream: ByteReader, max_bytes: int) -> tuple[bytes, bool]:
    kept = bytearray()
    cut = False
    while chunk := await stream.read(_CHUNK):
        kept += chunk
        if len(kept) > max_bytes:
            del kept[: len(kept) - max_bytes]
            cut = True
    return bytes(kept), cut
