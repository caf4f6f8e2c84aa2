"""What the ``gpu_cloud`` fixture gives a test: the session's instances, as they are now."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from pytest_gpucloud.core.request import parse_marker

if TYPE_CHECKING:
    from pytest_gpucloud.desk.service import FleetAccess, InstanceView
    from pytest_gpucloud.features.instance_handle import InstanceHandle


class GpuCloudHandle:
    """The fleet as a test sees it, through this process's access to it."""

    def __init__(self, provider: str, access: FleetAccess) -> None:
        self._provider = provider
        self._access = access

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def instances(self) -> list[InstanceView]:
        return self._access.instances()

    @property
    def cost_so_far(self) -> float:
        return sum(view.cost for view in self.instances)

    def instance(
        self, spec: object = None, **options: object
    ) -> contextlib.AbstractContextManager[InstanceHandle]:
        """``with gpu_cloud.instance("A100") as gpu:`` an instance of this test's own, deleted
        after the block: ``gpu.run(cmd)``, ``put``, ``get``, ``call(fn, ...)``. ``spec`` and
        ``options`` as for the ``gpu`` marker (``count``, ``vram``, ``image``)."""
        return self._access.lease(parse_marker((spec,), options))
