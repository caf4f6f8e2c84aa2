"""The order in which this process will ask for tests, where it knows it; the runs of quick
tests are read ahead in it (see :mod:`~pytest_gpucloud.transport.worker_link`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pytest_gpucloud.transport.worker_link import READ_AHEAD, RunSpec

if TYPE_CHECKING:
    from pytest_gpucloud.core.request import GpuRequest


class ReadAhead:
    """nodeid -> (its request, the test after it on its machine), and the run frames made
    from them; ``timeout`` and ``env``: the session's defaults (``--gpu-timeout``,
    ``--gpu-env``)."""

    def __init__(self, timeout: float, env: tuple[str, ...]) -> None:
        self._timeout = timeout
        self._env = env
        self._order: dict[str, tuple[GpuRequest, str | None]] = {}
        self._specs: dict[str, RunSpec] = {}

    def expect(self, order: dict[str, tuple[GpuRequest, str | None]]) -> None:
        self._order.update(order)

    def done(self, nodeid: str) -> None:
        """``nodeid`` ran: it is no longer ahead of anything."""
        self._order.pop(nodeid, None)
        self._specs.pop(nodeid, None)

    def runs_from(self, nodeid: str | None) -> list[RunSpec]:
        """The planned runs from ``nodeid`` on, as many as a link reads ahead, up to one
        with datasets (their URLs are presigned when it runs)."""
        specs: list[RunSpec] = []
        while nodeid in self._order and len(specs) < READ_AHEAD:
            if self._order[nodeid][0].data:
                break
            spec = self._specs.get(nodeid)
            if spec is None:
                request, following = self._order[nodeid]
                timeout = request.timeout_s or self._timeout
                env = allowed_env((*self._env, *request.env))
                spec = self._specs[nodeid] = RunSpec(nodeid, following, timeout, env)
            specs.append(spec)
            nodeid = spec.nextid
        return specs


def allowed_env(names: tuple[str, ...]) -> dict[str, str]:
    """The allow-listed variables that are set here, for one remote test."""
    return {name: os.environ[name] for name in sorted(set(names)) if name in os.environ}


def unset_env(names: tuple[str, ...]) -> list[str]:
    """The allow-listed variables that are not set here: no remote test gets them."""
    return sorted(set(names) - os.environ.keys())
