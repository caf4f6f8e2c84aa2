"""The ``sim`` provider: the ``rest`` provider pointed at an embedded simulated cloud."""

from __future__ import annotations

import asyncio
import secrets

from pytest_gpucloud.providers.rest import RestProvider
from pytest_gpucloud.sim import SimConfig, SimServer


class SimProvider(RestProvider):
    """Starts the simulated cloud on 127.0.0.1 for this session and stops it at the end."""

    name = "sim"
    simulated = True

    def __init__(self, server: SimServer, url: str, api_key: str) -> None:
        super().__init__(url, api_key)
        self._server = server

    @classmethod
    async def start(cls, boot_delay_s: float) -> SimProvider:
        api_key = secrets.token_urlsafe(24)
        server = SimServer(SimConfig(api_key=api_key, boot_delay_s=boot_delay_s))
        url = await asyncio.to_thread(server.start)
        return cls(server, url, api_key)

    async def aclose(self) -> None:
        await super().aclose()
        await asyncio.to_thread(self._server.stop)
