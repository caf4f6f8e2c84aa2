"""The simulated GPU cloud: the REST API over real HTTP, instances as real SSH servers.

It never imports the plugin: it shares only ``pytest_gpucloud.core.wire`` with it.
"""

from __future__ import annotations

from pytest_gpucloud.sim.config import SimConfig
from pytest_gpucloud.sim.server import SimServer

__all__ = ["SimConfig", "SimServer"]
