"""Run GPU-marked pytest tests on ephemeral cloud GPU instances.

What extenders may import lives here; every other module may change without notice. A
provider follows :class:`Provider` (or :class:`LeasingProvider`), is made by a
:data:`ProviderFactory` from the session's :class:`Settings`, and is registered through the
hook of :mod:`~pytest_gpucloud.hooks` or the entry-point group ``pytest_gpucloud.providers``.
:class:`RestProvider` is imported on first use (it brings HTTP with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_gpucloud import hooks
from pytest_gpucloud.config.settings import Settings
from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import (
    AuthError,
    GpuCloudError,
    InvalidRequest,
    NotFound,
    OutOfCapacity,
    ProviderError,
    RateLimited,
    Transient,
)
from pytest_gpucloud.providers import ProviderFactory
from pytest_gpucloud.providers.base import Instance, LeasingProvider, Provider

if TYPE_CHECKING:
    from pytest_gpucloud.providers.rest import RestProvider

__all__ = [
    "AuthError",
    "GpuCloudError",
    "GpuType",
    "Instance",
    "InvalidRequest",
    "LeasingProvider",
    "NotFound",
    "Offer",
    "OutOfCapacity",
    "Provider",
    "ProviderError",
    "ProviderFactory",
    "RateLimited",
    "RestProvider",
    "Settings",
    "Transient",
    "hooks",
]


def __getattr__(name: str) -> object:
    if name == "RestProvider":
        from pytest_gpucloud.providers.rest import RestProvider

        return RestProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
