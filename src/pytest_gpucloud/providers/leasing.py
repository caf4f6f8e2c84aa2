"""Leases of machines that outlive the session: wait a bounded while for a free one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from pytest_gpucloud.core.errors import NotFound, OutOfCapacity
from pytest_gpucloud.providers.base import Instance

T = TypeVar("T")
POLL_S = 0.2


class HoldsInstance(Protocol):
    @property
    def instance(self) -> Instance: ...


L = TypeVar("L", bound=HoldsInstance)


class LeaseBook(Generic[L]):
    """The leases a leasing provider holds, by instance id; ``delete`` ends one."""

    where = "here"

    def __init__(self) -> None:
        self._leases: dict[str, L] = {}

    async def delete(self, instance_id: str) -> None:
        raise NotImplementedError

    async def get(self, instance_id: str) -> Instance:
        held = self._leases.get(instance_id)
        if held is None:
            raise NotFound(f"no lease {instance_id} {self.where}")
        return held.instance

    async def list_instances(self, labels: dict[str, str]) -> list[Instance]:
        return [
            held.instance
            for held in self._leases.values()
            if labels.items() <= held.instance.labels.items()
        ]

    async def aclose(self) -> None:
        for instance_id in list(self._leases):
            await self.delete(instance_id)


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
