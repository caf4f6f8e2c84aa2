"""Which gpu test follows which on its machine: sent with each run, so a remote session
keeps the fixtures that consecutive tests share, and quick tests are read ahead."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pytest_gpucloud.session.stash import REQUEST_KEY

if TYPE_CHECKING:
    from pytest_gpucloud.core.request import GpuRequest

# The nodeid the remote session knows an item by: xdist's --dist loadgroup appends
# "@group" to the local one.
REMOTE_NODEID_KEY = pytest.StashKey[str]()


def remote_nodeid(item: pytest.Item) -> str:
    return item.stash.get(REMOTE_NODEID_KEY, item.nodeid)


class RunOrder:
    """The next test of each gpu item. A pool's consecutive tests share one remote session:
    each run names the next test of the pool. An xdist worker does not know its schedule: it
    names its own next item."""

    def __init__(self, in_xdist_worker: bool) -> None:
        self.in_xdist_worker = in_xdist_worker
        self._next: dict[str, str | None] = {}

    def plan(
        self, runnable: list[tuple[pytest.Item, GpuRequest]], *, read_ahead: bool
    ) -> dict[str, tuple[GpuRequest, str | None]]:
        """Note each item's next test; the order to read ahead in (``read_ahead`` False: none,
        as with -x, --maxfail or --stepwise, where the session may stop at any test)."""
        order: dict[str, tuple[GpuRequest, str | None]] = {}
        if self.in_xdist_worker:
            return order
        by_pool: dict[GpuRequest, list[pytest.Item]] = {}
        for item, request in runnable:
            by_pool.setdefault(request.pool_key, []).append(item)
        for items in by_pool.values():
            remote_ids = [remote_nodeid(item) for item in items]
            for item, following in zip(items, [*remote_ids[1:], None], strict=True):
                self._next[item.nodeid] = following
                if read_ahead:
                    order[remote_nodeid(item)] = (item.stash[REQUEST_KEY], following)
        return order

    def nextid(self, item: pytest.Item, nextitem: pytest.Item | None) -> str | None:
        if not self.in_xdist_worker:
            return self._next.pop(item.nodeid, None)
        following = nextitem.stash.get(REQUEST_KEY, None) if nextitem else None
        if nextitem is None or following is None:
            return None
        same_pool = following.pool_key == item.stash[REQUEST_KEY].pool_key
        return remote_nodeid(nextitem) if same_pool else None
