"""The simulated GPU cloud: the REST API over real HTTP, instances as real SSH servers.

It is a server: it never imports the session, scheduling, machine or providers. It shares
the wire models (``core.wire``) and the exec server (``transport.exec_server``) with them.
"""

from __future__ import annotations

from pytest_gpucloud.sim.config import SimConfig
from pytest_gpucloud.sim.server import SimServer

__all__ = ["SimConfig", "SimServer"]
