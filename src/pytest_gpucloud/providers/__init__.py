"""Providers turn an offer into a reachable machine and delete it again.

They come from a registry, filled by the hook ``pytest_gpucloud_register_providers`` (see
:mod:`pytest_gpucloud.hooks`) and by the entry-point group ``pytest_gpucloud.providers``.
The built-in ones register through the hook, like any other.

Providers obey rather than decide, and know no pytest. May import: ``transport``,
``config``, ``core`` (and ``sim``: ``providers/sim.py`` only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from pytest_gpucloud.core.environment import VENDOR_KEY_ENV
from pytest_gpucloud.core.errors import ConfigError, GpuCloudError
from pytest_gpucloud.providers import vendors

if TYPE_CHECKING:
    from pytest_gpucloud.config.settings import Settings
    from pytest_gpucloud.providers.base import Provider

ENTRY_POINT_GROUP = "pytest_gpucloud.providers"
ProviderFactory = Callable[["Settings"], Awaitable["Provider"]]


async def _rest(settings: Settings) -> Provider:
    from pytest_gpucloud.providers.rest import RestProvider

    if settings.api_url is None:
        raise ConfigError(
            "--gpu-provider rest needs the API's address: set GPUCLOUD_API_URL or --gpu-api-url"
        )
    if settings.api_key is None:
        raise ConfigError("--gpu-provider rest needs an API key: set GPUCLOUD_API_KEY")
    return RestProvider(settings.api_url, settings.api_key.get_secret_value())


async def _sim(settings: Settings) -> Provider:
    from pytest_gpucloud.providers.sim import SimProvider

    return await SimProvider.start(settings.sim_boot_delay)


async def _local(settings: Settings) -> Provider:
    from pytest_gpucloud.providers.local import LocalProvider

    return await LocalProvider.start(settings)


async def _ssh(settings: Settings) -> Provider:
    from pytest_gpucloud.providers.static_hosts import SshProvider

    return SshProvider.from_settings(settings)


async def _lambda(settings: Settings) -> Provider:
    from pytest_gpucloud.providers.lambda_cloud import BASE_URL, LambdaProvider

    policy = vendors.host_key_policy("lambda", settings)
    assert policy is not None
    return LambdaProvider(settings.api_url or BASE_URL, _vendor_key(settings, "lambda"), policy)


async def _runpod(settings: Settings) -> Provider:
    from pytest_gpucloud.providers.runpod import BASE_URL, RunPodProvider

    policy = vendors.host_key_policy("runpod", settings)
    assert policy is not None
    return RunPodProvider(settings.api_url or BASE_URL, _vendor_key(settings, "runpod"), policy)


async def _lyceum(settings: Settings) -> Provider:
    from pytest_gpucloud.providers.lyceum import BASE_URL, LyceumProvider

    policy = vendors.host_key_policy("lyceum", settings)
    assert policy is not None
    return LyceumProvider(settings.api_url or BASE_URL, _vendor_key(settings, "lyceum"), policy)


def _vendor_key(settings: Settings, vendor: str) -> str:
    key = settings.vendor_keys.get(vendor)
    if key is None:
        raise ConfigError(
            f"--gpu-provider {vendor} needs an API key: set {VENDOR_KEY_ENV[vendor]} (the key "
            "is read from the environment only)"
        )
    return key.get_secret_value()


BUILTIN: dict[str, ProviderFactory] = {
    "rest": _rest,
    "sim": _sim,
    "local": _local,
    "ssh": _ssh,
    "lambda": _lambda,
    "runpod": _runpod,
    "lyceum": _lyceum,
}


class ProviderRegistry:
    """Provider factories by name. Entry points are loaded only when their provider is made."""

    def __init__(self, factories: Mapping[str, ProviderFactory | EntryPoint]) -> None:
        self._factories = dict(factories)

    @classmethod
    def collect(cls, registered: Iterable[Mapping[str, ProviderFactory]]) -> ProviderRegistry:
        """The registry of the hook's answers (``registered``) and of the entry points."""
        found: dict[str, ProviderFactory | EntryPoint] = {}
        origins: dict[str, str] = {}
        sources: list[tuple[str, Mapping[str, ProviderFactory | EntryPoint]]] = [
            ("the hook pytest_gpucloud_register_providers", answer) for answer in registered
        ]
        sources.append(
            (
                f"the entry-point group {ENTRY_POINT_GROUP}",
                {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)},
            )
        )
        for source, factories in sources:
            for name, factory in factories.items():
                where = f"{_describe(factory)} (from {source})"
                if name in found:
                    raise ConfigError(
                        f"GPU provider {name!r} is registered twice: by {origins[name]} and "
                        f"by {where}; remove one of them"
                    )
                found[name] = factory
                origins[name] = where
        return cls(found)

    @property
    def names(self) -> list[str]:
        return sorted(self._factories)

    async def make(self, name: str, settings: Settings) -> Provider:
        """The provider called ``name``, configured from ``settings``."""
        factory = self._factories.get(name)
        if factory is None:
            raise ConfigError(
                f"unknown GPU provider {name!r}: choose one of {', '.join(self.names)}"
            )
        if isinstance(factory, EntryPoint):
            try:
                factory = factory.load()
            except Exception as exc:
                raise ConfigError(
                    f"GPU provider {name!r} ({factory.value}, entry point of "
                    f"{ENTRY_POINT_GROUP}) failed to load: {type(exc).__name__}: {exc}"
                ) from None
        try:
            provider: Provider = await factory(settings)
        except GpuCloudError:
            raise
        except Exception as exc:
            # A factory is user code (a conftest, a plugin): one line, not an INTERNALERROR.
            text = str(exc)
            if settings.api_key is not None:
                text = text.replace(settings.api_key.get_secret_value(), "***")
            raise ConfigError(
                f"GPU provider {name!r} ({_describe(factory)}) failed to start: "
                f"{type(exc).__name__}: {text}"
            ) from None
        return provider


def _describe(factory: ProviderFactory | EntryPoint) -> str:
    if isinstance(factory, EntryPoint):
        return factory.value
    module = getattr(factory, "__module__", "?")
    return f"{module}:{getattr(factory, '__qualname__', repr(factory))}"
