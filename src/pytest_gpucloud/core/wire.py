"""The REST API's wire models, shared by the ``rest`` provider and the simulated cloud.

This module is the only code the simulated cloud shares with the plugin.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

InstanceStatus = Literal["provisioning", "running", "terminating", "terminated", "failed"]
LIVE_STATUSES: frozenset[str] = frozenset({"provisioning", "running", "terminating"})

# Ids and labels travel into command lines and file names: allow no shell metacharacters.
SafeId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:@+-]{0,128}$")]
GpuName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
# Labels as a cloud may answer them (its own ones too): no shell or control characters.
AnswerLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9 ._:@+/=,-]{0,256}$")]


def _check_ip(value: str) -> str:
    ipaddress.ip_address(value)
    return value


IpAddress = Annotated[str, AfterValidator(_check_ip)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class GpuTypeModel(_Model):
    name: GpuName
    vram_gb: int = Field(ge=1, le=100_000)
    price_per_hour: float = Field(ge=0, le=10_000)
    available: bool = True
    regions: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")]] = Field(
        min_length=1
    )


class CreateInstanceRequest(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_type: GpuName
    count: int = Field(default=1, ge=1, le=16)
    image: str = Field(min_length=1, max_length=512)
    region: str | None = None
    ssh_public_key: str = Field(min_length=16, max_length=16_384)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    max_lifetime_s: int = Field(ge=60, le=7 * 24 * 3600)
    client_token: str = Field(min_length=8, max_length=128)


class InstanceModel(_Model):
    id: SafeId
    status: InstanceStatus
    gpu_type: GpuName
    count: int = Field(ge=1, le=16)
    region: SafeId  # shown in the summary: letters, digits and ._- only
    price_per_hour: float = Field(ge=0, le=10_000)
    created_at: datetime
    labels: dict[AnswerLabel, AnswerLabel] = Field(default_factory=dict, max_length=64)
    ip: IpAddress | None = None
    ssh_port: int | None = Field(default=None, ge=1, le=65535)
    ssh_user: SafeId | None = None
    ssh_host_key: str | None = Field(default=None, max_length=16_384)


#: What went wrong, as the API's error answers name it (other modules type with it too).
ErrorCode = Literal[
    "out_of_capacity",
    "quota_exceeded",
    "rate_limited",
    "unauthorized",
    "invalid_request",
    "not_found",
    "internal",
]


class ErrorDetail(_Model):
    code: ErrorCode
    message: str = Field(max_length=4096)


class ErrorBody(_Model):
    error: ErrorDetail


# The simulated cloud's admin API (``/_sim/...``): records for tests and the CLI.


class SimCommandRecord(_Model):
    """One process run over SSH on a sim instance; a negative exit status is a signal."""

    command: str
    env: dict[str, str]
    started_at: datetime
    ended_at: datetime | None = None
    exit_status: int | None = None


class SimInstanceRecord(_Model):
    """Everything the sim knows about one instance it ever created (``home``: its HOME)."""

    id: str
    gpu_type: str
    count: int
    region: str
    status: InstanceStatus
    labels: dict[str, str]
    created_at: datetime
    running_at: datetime | None = None
    deleted_at: datetime | None = None
    terminated_at: datetime | None = None
    termination_reason: Literal["deleted", "max_lifetime", "preempted", "sim_stopped"] | None = None
    ssh_port: int | None = None
    home: str | None = None
    commands: list[SimCommandRecord] = Field(default_factory=list)


class SimRequestRecord(_Model):
    """One request to the ``/v1`` API, stamped with the time it arrived."""

    method: str
    path: str
    query: str
    status: int
    time: datetime
