"""Fault rules for the simulated cloud, added at run time with ``POST /_sim/faults``.

Every rule has ``kind``, ``times`` (how many times it fires; ``null``: every time) and an
optional ``gpu_type`` it is limited to. Rules are tried in the order they were added.

API faults also match on ``op`` (``gpu_types``, ``create``, ``get``, ``list``, ``delete``;
``null``: any) and change the answer of one request: the first matching rule fires.
Instance faults fire on the next created instance(s) of a matching type: every matching
rule fires on each new instance.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from pytest_gpucloud.core.wire import ErrorCode

Op = Literal["gpu_types", "create", "get", "list", "delete"]
# A file name in an instance's home whose appearance fires a fault (no directories).
OnFile = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    times: int | None = Field(default=1, ge=1)
    gpu_type: str | None = None


class ApiRule(_Rule):
    """Base of the API faults."""

    op: Op | None = None


class HttpError(ApiRule):
    """Answer this error instead of carrying out the request (``retry_after``: header, s).

    ``{"kind": "http_error", "op": "create", "status": 429, "code": "rate_limited",
    "retry_after": 1}``
    """

    kind: Literal["http_error"]
    status: int = Field(ge=400, le=599)
    code: ErrorCode
    message: str = "injected fault"
    retry_after: int | None = Field(default=None, ge=0)


class HttpErrorAfter(ApiRule):
    """Carry out the request, then answer an error: a retried create with the same
    ``client_token`` must get the instance that was made. ``{"kind": "http_error_after"}``
    """

    kind: Literal["http_error_after"]
    op: Op | None = "create"
    status: int = Field(default=500, ge=400, le=599)
    code: ErrorCode = "internal"
    message: str = "injected fault after the request was carried out"


class Slow(ApiRule):
    """Wait ``delay_s`` before handling the request. ``{"kind": "slow", "delay_s": 2}``"""

    kind: Literal["slow"]
    delay_s: float = Field(ge=0)


class Malformed(ApiRule):
    """Answer this raw body instead; the request is not carried out.

    ``{"kind": "malformed", "op": "get", "body": "{\\"id\\": "}``
    """

    kind: Literal["malformed"]
    body: str
    status: int = Field(default=200, ge=100, le=599)
    content_type: str = "application/json"


class Override(ApiRule):
    """Merge ``fields`` into the JSON answer (into each item of a list answer).

    ``{"kind": "override", "op": "get", "fields": {"ip": "10.0.0.1; reboot"}}``
    """

    kind: Literal["override"]
    fields: dict[str, Any]


class IgnoreDelete(ApiRule):
    """Answer a delete with 202 but keep the instance. ``{"kind": "ignore_delete"}``"""

    kind: Literal["ignore_delete"]
    op: Literal["delete"] = "delete"


class InstanceRule(_Rule):
    """Base of the instance faults."""


class BootNever(InstanceRule):
    """The instance stays ``provisioning``. ``{"kind": "boot_never"}``"""

    kind: Literal["boot_never"]


class BootFail(InstanceRule):
    """The instance becomes ``failed`` instead of ``running``. ``{"kind": "boot_fail"}``"""

    kind: Literal["boot_fail"]


class WrongHostKey(InstanceRule):
    """The machine presents a host key other than the one the API announces, or than the one
    injected at create. ``{"kind": "wrong_host_key"}``"""

    kind: Literal["wrong_host_key"]


class SshRefuse(InstanceRule):
    """Nothing listens on the announced SSH port. ``{"kind": "ssh_refuse"}``"""

    kind: Literal["ssh_refuse"]


class NoSocketForwarding(InstanceRule):
    """The SSH server refuses forwarding to Unix sockets, as sshd with
    ``AllowStreamLocalForwarding no`` does. ``{"kind": "no_socket_forwarding"}``"""

    kind: Literal["no_socket_forwarding"]


class DropSsh(InstanceRule):
    """Abort every SSH connection of the instance once; it stays running and reachable.

    The drop comes ``after_s`` (default 0) after the instance starts running or, with
    ``after_commands: n``, after its n-th command started (so it hits that command), or,
    with ``on_file: name``, as soon as a file of that name appears in the instance's home
    (so a test can choose its moment). ``{"kind": "drop_ssh", "after_commands": 2,
    "after_s": 0.5}``, ``{"kind": "drop_ssh", "on_file": "drop-now"}``
    """

    kind: Literal["drop_ssh"]
    after_s: float | None = Field(default=None, ge=0)
    after_commands: int | None = Field(default=None, ge=1)
    on_file: OnFile | None = None

    @model_validator(mode="after")
    def _needs_a_moment(self) -> DropSsh:
        if self.on_file is not None and (self.after_s, self.after_commands) != (None, None):
            raise ValueError("drop_ssh takes on_file alone, or after_s and after_commands")
        if self.after_s is None and self.after_commands is None and self.on_file is None:
            raise ValueError("drop_ssh needs after_s, after_commands or on_file")
        return self


class Preempt(InstanceRule):
    """``after_s`` after it starts running, or as soon as a file named ``on_file`` appears in
    its home, the instance is lost: SSH closed, processes killed, status ``terminated``.
    ``{"kind": "preempt", "after_s": 1.5}``, ``{"kind": "preempt", "on_file": "lose-me"}``
    """

    kind: Literal["preempt"]
    after_s: float | None = Field(default=None, ge=0)
    on_file: OnFile | None = None

    @model_validator(mode="after")
    def _needs_one_moment(self) -> Preempt:
        if (self.after_s is None) == (self.on_file is None):
            raise ValueError("preempt needs after_s or on_file (one of them)")
        return self


class AddressLate(InstanceRule):
    """The instance reports running for ``delay_s`` before its address shows (the null-IP
    window some clouds have). ``{"kind": "address_late", "delay_s": 1}``"""

    kind: Literal["address_late"]
    delay_s: float = Field(ge=0)


class WrongGpu(InstanceRule):
    """The instance declares other GPUs than it was created with: its processes see
    ``GPUCLOUD_SIM_GPU`` set to ``gpu`` (``TYPE:COUNT``). ``{"kind": "wrong_gpu", "gpu":
    "A10G:1"}``
    """

    kind: Literal["wrong_gpu"]
    gpu: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}:[0-9]{1,2}$")]


FaultRule = Annotated[
    HttpError
    | HttpErrorAfter
    | Slow
    | Malformed
    | Override
    | IgnoreDelete
    | BootNever
    | BootFail
    | WrongHostKey
    | SshRefuse
    | NoSocketForwarding
    | DropSsh
    | Preempt
    | AddressLate
    | WrongGpu,
    Field(discriminator="kind"),
]


class FaultList(BaseModel):
    """Body of ``POST /_sim/faults`` and answer of every ``/_sim/faults`` call."""

    model_config = ConfigDict(extra="forbid")

    faults: list[FaultRule]


class FaultBook:
    """The active rules; a rule leaves the book when its ``times`` are used up."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []

    def take_api(self, op: Op, gpu_type: str | None) -> ApiRule | None:
        for rule in self.rules:
            if isinstance(rule, ApiRule) and rule.op in (None, op) and _fits(rule, gpu_type):
                self._use(rule)
                return rule
        return None

    def take_instance(self, gpu_type: str) -> list[InstanceRule]:
        taken: list[InstanceRule] = [
            r for r in self.rules if isinstance(r, InstanceRule) and _fits(r, gpu_type)
        ]
        for rule in taken:
            self._use(rule)
        return taken

    def _use(self, rule: _Rule) -> None:
        if rule.times is not None:
            rule.times -= 1
            if rule.times == 0:
                self.rules = [r for r in self.rules if r is not rule]


def _fits(rule: _Rule, gpu_type: str | None) -> bool:
    return rule.gpu_type is None or rule.gpu_type == gpu_type
