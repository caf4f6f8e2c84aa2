"""All settings in one pydantic model; the only reader of options, ini keys and environment.

Precedence: command line > environment (``GPUCLOUD_*``) > ini (``gpu_cloud_*``) > default.
``GPUCLOUD_API_KEY`` is read from the environment only and is never shown.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from pytest_gpucloud.errors import ConfigError
from pytest_gpucloud.units import parse_duration

API_KEY_ENV = "GPUCLOUD_API_KEY"


@dataclass(frozen=True)
class Option:
    """One setting as the user spells it on each of its three sources."""

    field: str
    flag: str
    help: str
    env: str | None = None
    is_switch: bool = False
    metavar: str | None = None

    @property
    def ini(self) -> str:
        return "gpu_cloud_" + self.field

    @property
    def dest(self) -> str:
        return "gpu_cloud_opt_" + self.field


OPTIONS: tuple[Option, ...] = (
    Option(
        "enabled",
        "--gpu-cloud",
        "run gpu-marked tests on cloud GPU instances",
        env="GPUCLOUD_ENABLED",
        is_switch=True,
    ),
    Option(
        "provider",
        "--gpu-provider",
        "where instances come from: rest (a cloud API) or sim "
        "(the simulated cloud, on this machine's CPU)",
        env="GPUCLOUD_PROVIDER",
        metavar="NAME",
    ),
    Option(
        "api_url",
        "--gpu-api-url",
        "base URL of the GPU cloud API (https, or http on loopback)",
        env="GPUCLOUD_API_URL",
        metavar="URL",
    ),
    Option(
        "image",
        "--gpu-image",
        "container image of the instances",
        env="GPUCLOUD_IMAGE",
        metavar="IMAGE",
    ),
    Option(
        "timeout",
        "--gpu-timeout",
        "time limit of one remote test, e.g. 300, 90s, 10m",
        env="GPUCLOUD_TIMEOUT",
        metavar="DURATION",
    ),
    Option(
        "boot_timeout",
        "--gpu-boot-timeout",
        "time limit for an instance to boot and answer over SSH",
        env="GPUCLOUD_BOOT_TIMEOUT",
        metavar="DURATION",
    ),
    Option(
        "max_lifetime",
        "--gpu-max-lifetime",
        "server-side lifetime of every instance, "
        "deleted by the cloud when it passes (default: derived from the timeouts)",
        env="GPUCLOUD_MAX_LIFETIME",
        metavar="DURATION",
    ),
    Option(
        "sim_boot_delay",
        "--gpu-sim-boot-delay",
        "boot time of the simulated cloud's instances",
        env="GPUCLOUD_SIM_BOOT_DELAY",
        metavar="DURATION",
    ),
)

BUILTIN_PROVIDERS = ("rest", "sim")
NO_PROVIDER = (
    "--gpu-cloud has no GPU provider: set GPUCLOUD_API_KEY and GPUCLOUD_API_URL (or "
    "--gpu-api-url) to use your cloud's API, or pass --gpu-provider sim to try it on this "
    "machine's CPU with the simulated cloud"
)
Duration = float


class Settings(BaseModel):
    """The resolved settings of one session. Its repr never shows the API key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    provider: Literal["rest", "sim"] | None = None
    api_url: str | None = None
    api_key: SecretStr | None = Field(default=None, repr=False)
    image: str = Field(default="python:3.12-slim", min_length=1)
    timeout: Duration = Field(default=1800.0, gt=0)
    boot_timeout: Duration = Field(default=600.0, gt=0)
    max_lifetime: Duration | None = Field(default=None, ge=60)
    sim_boot_delay: Duration = Field(default=0.3, ge=0)

    @field_validator("timeout", "boot_timeout", "max_lifetime", "sim_boot_delay", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        return None if value is None else check_api_url(value)

    def chosen_provider(self) -> str:
        """The provider to use; without one and without an API key, say both ways forward."""
        if self.provider is not None:
            return self.provider
        if self.api_key is not None:
            return "rest"
        raise ConfigError(NO_PROVIDER)

    @property
    def lifetime_s(self) -> int:
        """The dead-man switch sent with every create call."""
        if self.max_lifetime is not None:
            return int(self.max_lifetime)
        return int(self.boot_timeout + 2 * self.timeout + 3600)


def check_api_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL such as https://api.example.com")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must use https unless it points at this machine (127.0.0.1)")
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Source:
    value: Any
    where: str


def resolve(
    cli: Callable[[str], Any], ini: Callable[[str], Any], environ: Mapping[str, str]
) -> Settings:
    """Build :class:`Settings` from the three sources; a bad value raises ConfigError."""
    sources: dict[str, _Source] = {}
    for option in OPTIONS:
        source = _pick(option, cli(option.dest), ini(option.ini), environ)
        if source is not None:
            sources[option.field] = source
    values: dict[str, Any] = {field: source.value for field, source in sources.items()}
    if environ.get(API_KEY_ENV):
        values["api_key"] = environ[API_KEY_ENV]
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise _config_error(exc, sources) from None


def _pick(
    option: Option, cli_value: Any, ini_value: Any, environ: Mapping[str, str]
) -> _Source | None:
    if cli_value is not None:
        return _Source(cli_value, option.flag)
    if option.env and environ.get(option.env, "") != "":
        return _Source(environ[option.env], option.env)
    if ini_value not in (None, "", []):
        return _Source(ini_value, f"ini {option.ini}")
    return None


def _config_error(exc: ValidationError, sources: Mapping[str, _Source]) -> ConfigError:
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    source = sources.get(field)
    where = source.where if source else field
    shown = "" if source is None else f" {str(source.value)[:80]!r}"
    reason = str(error["msg"]).removeprefix("Value error, ")
    hint = _HINTS.get(field, "")
    return ConfigError(f"{where}{shown}: {reason}{hint}")


_HINTS = {
    "provider": f" (choose one of: {', '.join(BUILTIN_PROVIDERS)})",
    "timeout": " (a duration such as 300, 90s, 10m or 1h30m)",
    "boot_timeout": " (a duration such as 300, 90s, 10m or 1h30m)",
    "max_lifetime": " (a duration of at least 60 s, such as 2h)",
    "sim_boot_delay": " (a duration such as 0.5 or 3s)",
}


def from_config(config: pytest.Config) -> Settings:
    def ini(name: str) -> Any:
        return config.getini(name)

    return resolve(lambda dest: config.getoption(dest, None), ini, os.environ)
