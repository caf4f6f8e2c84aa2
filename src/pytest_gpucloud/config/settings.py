"""All settings in one pydantic model; the only reader of options, ini keys and environment.

Precedence: command line > environment (``GPUCLOUD_*``) > ini (``gpu_cloud_*``) > default.
``GPUCLOUD_API_KEY`` is read from the environment only and is never shown.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from pytest_gpucloud.core.addresses import parse_hosts, split_url
from pytest_gpucloud.core.environment import API_KEY_ENV, VENDOR_KEY_ENV, env_name_fault
from pytest_gpucloud.core.errors import ConfigError
from pytest_gpucloud.core.units import parse_duration, parse_size

HostKeyPolicy = Literal["inject", "announced", "tofu", "strict"]


@dataclass(frozen=True)
class Option:
    """One setting as the user spells it on each of its three sources."""

    field: str
    flag: str
    help: str
    env: str | None = None
    is_switch: bool = False
    metavar: str | None = None
    #: A list: the flag may be repeated; the ini key and environment take a list of words.
    repeatable: bool = False

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
        "where instances come from: rest (a cloud API), sim (the simulated cloud, on this "
        "machine's CPU), local (this machine's GPUs), ssh (static hosts, see --gpu-hosts) "
        "or a provider a plugin registers",
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
        "runtime",
        "--gpu-runtime",
        "container runtime on the instances: docker, podman, apptainer or none (default: "
        "none, the tests run on the instance itself)",
        env="GPUCLOUD_RUNTIME",
        metavar="RUNTIME",
    ),
    Option(
        "setup",
        "--gpu-setup",
        "shell command run once per instance (in its container) before its first test, "
        "e.g. 'pip install -e .[test]'; skipped where it ran already with the same files",
        env="GPUCLOUD_SETUP",
        metavar="CMD",
    ),
    Option(
        "hosts",
        "--gpu-hosts",
        "static hosts of --gpu-provider ssh: user@host:port=TYPE[:COUNT], separated by commas",
        env="GPUCLOUD_HOSTS",
        metavar="HOSTS",
    ),
    Option(
        "known_hosts",
        "--gpu-known-hosts",
        "known_hosts file with the host keys of --gpu-hosts (default ~/.ssh/known_hosts)",
        env="GPUCLOUD_KNOWN_HOSTS",
        metavar="PATH",
    ),
    Option(
        "ssh_key",
        "--gpu-ssh-key",
        "private key that logs in to --gpu-hosts (default: ~/.ssh/id_* and the SSH agent)",
        env="GPUCLOUD_SSH_KEY",
        metavar="PATH",
    ),
    Option(
        "host_key",
        "--gpu-host-key",
        "how instances' SSH host keys are verified: inject (a key made here goes onto the "
        "instance), announced (the API's), tofu (trust the first, where neither exists) or "
        "strict (inject or announced, never tofu); default: the provider's best",
        env="GPUCLOUD_HOST_KEY",
        metavar="POLICY",
    ),
    Option(
        "spot",
        "--gpu-spot",
        "ask for interruptible (spot) capacity for every gpu test, where the provider has it",
        env="GPUCLOUD_SPOT",
        is_switch=True,
    ),
    Option(
        "spot_fallback",
        "--gpu-spot-fallback",
        "retry a test whose spot instance was preempted on on-demand capacity",
        env="GPUCLOUD_SPOT_FALLBACK",
        is_switch=True,
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
        "env",
        "--gpu-env",
        "pass this environment variable to the remote tests (repeatable; values are never "
        "shown); the environment variable and ini key take names separated by commas or spaces",
        env="GPUCLOUD_ENV",
        metavar="NAME",
        repeatable=True,
    ),
    Option(
        "retries",
        "--gpu-retries",
        "how many fresh instances may replace lost ones, per kind of instance (default 2)",
        env="GPUCLOUD_RETRIES",
        metavar="N",
    ),
    Option(
        "regions",
        "--gpu-region",
        "allowed regions, patterns separated by commas such as 'eu-*'; an offer elsewhere "
        "is never created (default: all)",
        env="GPUCLOUD_REGIONS",
        metavar="PATTERNS",
    ),
    Option(
        "max_instances",
        "--gpu-max-instances",
        "most instances alive at once (default 8)",
        env="GPUCLOUD_MAX_INSTANCES",
        metavar="N",
    ),
    Option(
        "max_creates",
        "--gpu-max-creates",
        "most create calls of a session, failovers included (default 20)",
        env="GPUCLOUD_MAX_CREATES",
        metavar="N",
    ),
    Option(
        "budget",
        "--gpu-budget",
        "most US dollars the session's instances may cost; a test that would pass it ends "
        "as an error (default: no limit)",
        env="GPUCLOUD_BUDGET",
        metavar="USD",
    ),
    Option(
        "start",
        "--gpu-start",
        "when instances start: jit (ready about when their first test is due, from earlier "
        "runs' durations), eager (all when collection ends) or lazy (at first use)",
        env="GPUCLOUD_START",
        metavar="MODE",
    ),
    Option(
        "plan",
        "--gpu-plan",
        "print the instances the session would create, their tests and expected cost; "
        "create nothing and run no test",
        env="GPUCLOUD_PLAN",
        is_switch=True,
    ),
    Option(
        "report",
        "--gpu-report",
        "write the cost report (instances, tests, costs) as JSON to this file",
        env="GPUCLOUD_REPORT",
        metavar="PATH",
    ),
    Option(
        "session_id",
        "--gpu-session-id",
        "label the session's instances with this id (default: a random one); "
        "python -m pytest_gpucloud cleanup --session ID deletes them whatever became of "
        "the session",
        env="GPUCLOUD_SESSION_ID",
        metavar="ID",
    ),
    Option(
        "summary_md",
        "--gpu-summary-md",
        "append the session's summary as markdown to this file (default: "
        "$GITHUB_STEP_SUMMARY when set)",
        env="GPUCLOUD_SUMMARY_MD",
        metavar="PATH",
    ),
    Option(
        "timeline",
        "--gpu-timeline",
        "draw the session's timeline (instances, their tests, the local tests) as SVG to this file",
        env="GPUCLOUD_TIMELINE",
        metavar="PATH",
    ),
    Option(
        "plan_md",
        "--gpu-plan-md",
        "with --gpu-plan: also write the plan as a markdown table to this file, e.g. for "
        "a pull-request comment",
        env="GPUCLOUD_PLAN_MD",
        metavar="PATH",
    ),
    Option(
        "artifacts_dir",
        "--gpu-artifacts-dir",
        "where each remote test's gpu_artifacts folder is brought back to, one folder per "
        "test (default .gpucloud/artifacts/<run-id> under the rootdir)",
        env="GPUCLOUD_ARTIFACTS_DIR",
        metavar="DIR",
    ),
    Option(
        "artifacts_max",
        "--gpu-artifacts-max",
        "most bytes of artifacts brought back per test, e.g. 500MB; files past it stay on "
        "the instance and are named in the summary (default 1GB)",
        env="GPUCLOUD_ARTIFACTS_MAX",
        metavar="SIZE",
    ),
    Option(
        "artifacts_s3",
        "--gpu-artifacts-s3",
        "also upload each test's artifacts to s3://bucket/prefix/<run-id>/<test>/, from "
        "this machine (AWS credentials from the usual AWS environment variables)",
        env="GPUCLOUD_ARTIFACTS_S3",
        metavar="URL",
    ),
    Option(
        "s3_endpoint",
        "--gpu-s3-endpoint",
        "endpoint URL of an S3-compatible store (MinIO, Ceph, R2, ...) for artifacts and "
        "gpu(data=...) (default: AWS S3, or AWS_ENDPOINT_URL_S3)",
        env="GPUCLOUD_S3_ENDPOINT",
        metavar="URL",
    ),
    Option(
        "sim_boot_delay",
        "--gpu-sim-boot-delay",
        "boot time of the simulated cloud's instances",
        env="GPUCLOUD_SIM_BOOT_DELAY",
        metavar="DURATION",
    ),
)

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
    provider: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    api_url: str | None = None
    api_key: SecretStr | None = Field(default=None, repr=False)
    vendor_keys: dict[str, SecretStr] = Field(default_factory=dict, repr=False)
    host_key: HostKeyPolicy | None = None
    spot: bool = False
    spot_fallback: bool = False
    image: str = Field(default="python:3.12-slim", min_length=1)
    timeout: Duration = Field(default=1800.0, gt=0)
    boot_timeout: Duration = Field(default=600.0, gt=0)
    max_lifetime: Duration | None = Field(default=None, ge=60)
    sim_boot_delay: Duration = Field(default=0.3, ge=0)
    runtime: Literal["none", "docker", "podman", "apptainer"] = "none"
    setup: str | None = Field(default=None, min_length=1)
    hosts: str | None = None
    known_hosts: str | None = Field(default=None, min_length=1)
    ssh_key: str | None = Field(default=None, min_length=1)
    env: tuple[str, ...] = ()
    retries: int = Field(default=2, ge=0, le=100)
    regions: tuple[str, ...] = ()
    max_instances: int = Field(default=8, ge=1, le=1000)
    max_creates: int = Field(default=20, ge=1, le=10_000)
    budget: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    start: Literal["jit", "eager", "lazy"] = "jit"
    plan: bool = False
    report: str | None = Field(default=None, min_length=1)
    session_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,63}$")
    summary_md: str | None = Field(default=None, min_length=1)
    timeline: str | None = Field(default=None, min_length=1)
    plan_md: str | None = Field(default=None, min_length=1)
    artifacts_dir: str | None = Field(default=None, min_length=1)
    artifacts_max: int = Field(default=10**9, gt=0)
    artifacts_s3: str | None = None
    s3_endpoint: str | None = None

    @field_validator("timeout", "boot_timeout", "max_lifetime", "sim_boot_delay", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("regions", mode="before")
    @classmethod
    def _region_patterns(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        patterns = tuple(p.strip() for p in value.split(",") if p.strip())
        for pattern in patterns:
            if not _REGION.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not a region pattern")
        if not patterns:
            raise ValueError("no region pattern given")
        return patterns

    @field_validator("budget", mode="before")
    @classmethod
    def _dollars(cls, value: object) -> object:
        return value.strip().removeprefix("$") if isinstance(value, str) else value

    @field_validator("env", mode="before")
    @classmethod
    def _env_names(cls, value: object) -> object:
        words = [value] if isinstance(value, str) else value
        if not isinstance(words, (list, tuple)):
            return value
        names = [name for word in words for name in re.split(r"[\s,]+", str(word)) if name]
        for name in names:
            check_env_name(name)
        return tuple(sorted(set(names)))

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = (info.context or {}).get("providers")
        if value is not None and known is not None and value not in known:
            raise ValueError(f"unknown GPU provider; choose one of: {', '.join(sorted(known))}")
        return value

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hosts(value)
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        return None if value is None else check_api_url(value)

    @field_validator("artifacts_max", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("artifacts_s3")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None:
            split_url(value)
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _s3_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://minio.example.com:9000")
        return value.rstrip("/")

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


def check_env_name(name: str) -> str:
    """``name`` if the remote tests may be given this environment variable."""
    fault = env_name_fault(name)
    if fault == "not a name":
        raise ValueError(f"{name!r} is not an environment variable name")
    if fault == "secret":
        raise ValueError(f"{name} never travels to instances")
    return name


_REGION = re.compile(r"[A-Za-z0-9*?\[\]!-]{1,64}")


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
    cli: Callable[[str], Any],
    ini: Callable[[str], Any],
    environ: Mapping[str, str],
    providers: Collection[str] | None = None,
) -> Settings:
    """Build :class:`Settings` from the three sources; a bad value raises ConfigError.

    ``providers``: the names a provider may have (the registry's); None: any name.
    """
    sources: dict[str, _Source] = {}
    for option in OPTIONS:
        source = _pick(option, cli(option.dest), ini(option.ini), environ)
        if source is not None:
            sources[option.field] = source
    values: dict[str, Any] = {field: source.value for field, source in sources.items()}
    if environ.get(API_KEY_ENV):
        values["api_key"] = environ[API_KEY_ENV]
    values["vendor_keys"] = {
        vendor: environ[name] for vendor, name in VENDOR_KEY_ENV.items() if environ.get(name)
    }
    try:
        settings = Settings.model_validate(values, context={"providers": providers})
    except ValidationError as exc:
        raise _config_error(exc, sources) from None
    if settings.plan and not settings.enabled:
        # A plan is of the --gpu-cloud session: asking for it is enough.
        return settings.model_copy(update={"enabled": True})
    return settings


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
    shown = "" if source is None else f" {_shown(source.value)[:80]!r}"
    reason = str(error["msg"]).removeprefix("Value error, ")
    hint = _HINTS.get(field, "")
    return ConfigError(f"{where}{shown}: {reason}{hint}")


def _shown(value: Any) -> str:
    """A value as the user typed it: a repeated option's words joined, not a Python list."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


_HINTS = {
    "timeout": " (a duration such as 300, 90s, 10m or 1h30m)",
    "boot_timeout": " (a duration such as 300, 90s, 10m or 1h30m)",
    "max_lifetime": " (a duration of at least 60 s, such as 2h)",
    "sim_boot_delay": " (a duration such as 0.5 or 3s)",
    "env": " (names of environment variables such as HF_TOKEN; their values stay unshown)",
    "retries": " (a whole number such as 0 or 3)",
    "regions": " (region patterns separated by commas, such as 'eu-*' or 'us-east-1,eu-*')",
    "max_instances": " (a whole number of at least 1, such as 4)",
    "max_creates": " (a whole number of at least 1, such as 20)",
    "budget": " (US dollars, a positive number such as 5 or 12.50)",
    "start": " (choose one of: jit, eager, lazy)",
    "host_key": " (choose one of: inject, announced, tofu, strict)",
    "artifacts_max": " (a size such as 500MB, 2GB or 1.5GiB)",
    "artifacts_s3": " (such as s3://my-bucket/ci-artifacts)",
    "session_id": " (up to 64 letters, digits and ._:@+-, such as gh-1234-1)",
}


def from_config(config: pytest.Config, providers: Collection[str] | None = None) -> Settings:
    def ini(name: str) -> Any:
        return config.getini(name)

    return resolve(lambda dest: config.getoption(dest, None), ini, os.environ, providers)
