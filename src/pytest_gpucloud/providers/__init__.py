"""Providers turn an offer into a reachable machine and delete it again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_gpucloud.errors import ConfigError

if TYPE_CHECKING:
    from pytest_gpucloud.providers.base import Provider
    from pytest_gpucloud.settings import Settings


async def make_provider(name: str, settings: Settings) -> Provider:
    """The provider called ``name``, configured from ``settings``."""
    if name == "sim":
        from pytest_gpucloud.providers.sim import SimProvider

        return await SimProvider.start(settings.sim_boot_delay)
    if name == "rest":
        from pytest_gpucloud.providers.rest import RestProvider

        if settings.api_url is None:
            raise ConfigError(
                "--gpu-provider rest needs the API's address: set GPUCLOUD_API_URL or --gpu-api-url"
            )
        if settings.api_key is None:
            raise ConfigError("--gpu-provider rest needs an API key: set GPUCLOUD_API_KEY")
        return RestProvider(settings.api_url, settings.api_key.get_secret_value())
    raise ConfigError(f"unknown GPU provider {name!r}: choose rest or sim")
