"""Leases of machines that outlive the session: wait a bounded while for a free one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pytest_gpucloud.errors import OutOfCapacity

T = TypeVar("T")
POLL_S = 0.2


async def lease(
    try_once: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    all_held_here: Callable[[], bool],
    timeout: float,
) -> T:
    """Call ``try_once`` until it leases something (not None).

    While others (other sessions, other processes) hold what is wanted, wait for them up to
    ``timeout``; where this provider holds it all itself, waiting cannot help: fail at once.
    Both raise :class:`OutOfCapacity` naming ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = await try_once()
        if got is not None:
            return got
        if all_held_here():
            raise OutOfCapacity(
                f"{what}: all leased by this session already (one per kind of instance)"
            )
        if time.monotonic() + POLL_S > deadline:
            raise OutOfCapacity(f"{what}: still leased by other sessions after {timeout:g} s")
        await asyncio.sleep(POLL_S)
