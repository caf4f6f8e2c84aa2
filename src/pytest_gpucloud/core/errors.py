"""The plugin's error types: infrastructure errors, never to be confused with test failures.

Every message shown to a user starts with ``gpu-cloud:`` (see :func:`GpuCloudError.__str__`),
names the culprit and, where there is one, the fix.
"""

from __future__ import annotations

from typing import Any

PREFIX = "gpu-cloud: "


class GpuCloudError(Exception):
    """Base of every error this plugin raises on purpose."""

    def __str__(self) -> str:
        text = super().__str__()
        return text if text.startswith(PREFIX) else PREFIX + text


class ConfigError(GpuCloudError):
    """A bad option, ini value or environment variable."""


class MarkerError(GpuCloudError):
    """A bad ``@pytest.mark.gpu(...)`` argument."""


class ProviderError(GpuCloudError):
    """The cloud API refused or failed a request."""


class OutOfCapacity(ProviderError):
    """No capacity for the requested offer; try another one."""


class RateLimited(ProviderError):
    """Too many requests; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthError(ProviderError):
    """The API key was refused."""


class QuotaExceeded(ProviderError):
    """The account may have no more instances: one clear error, no failover to other offers."""


class InvalidRequest(ProviderError):
    """The API rejected the request as malformed."""


class Transient(ProviderError):
    """A 5xx answer or a timeout: the same request may succeed later."""


class NotFound(ProviderError):
    """The instance does not exist (any more)."""


class BadAnswer(ProviderError):
    """The API answered something that is not what the API promises."""


class InstanceError(GpuCloudError):
    """An instance could not be reached, set up or kept alive."""


class HostKeyMismatch(InstanceError):
    """The instance's SSH host key differs from the one the API announced."""


class RemoteError(InstanceError):
    """The remote worker crashed, hung or spoke an unexpected protocol."""


class TimeLimitExceeded(RemoteError):
    """A remote test outlived its time limit. ``reports``: the serialized reports of its
    phases that ended before, so it is reported in the phase it was in; ``remote_root``: the
    workspace their paths name."""

    def __init__(self, message: str, reports: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.reports = reports
        self.remote_root = ""


class GpuMismatch(InstanceError):
    """The instance does not show the GPUs its request asked for (type or count)."""


class BudgetError(GpuCloudError):
    """Running a test would pass ``--gpu-budget``."""


class ServiceError(GpuCloudError):
    """A ``gpu_service`` server could not start, got no healthy answer, or is gone."""
