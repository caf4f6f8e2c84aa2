"""The ``lambda`` provider: Lambda Cloud's API (``/api/v1``, spec 1.10.0), key ``LAMBDA_API_KEY``.

- Catalog: ``GET /instance-types`` (``data`` keyed by type name, cents per hour for the whole
  instance); an instance type ``gpu_8x_h100_sxm5`` is 8 GPUs of type ``H100-SXM5``.
- The session's SSH key is registered on the account as ``gpucloud-<session>-<expiry>`` at
  the first launch and deleted at the end; ``cleanup`` deletes those of dead sessions.
- One instance per launch, at most one launch every 12 s: the provider waits its turn rather
  than draw a 429. A launch is never retried blindly (Lambda has no idempotency token): the
  session's end-of-run sweep finds an instance whose answer was lost, by its tags.
- Host keys are injected: cloud-init's ``ssh_keys`` in the launch's ``user_data``.
- Errors are read by ``error.code``, never by the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from pytest_gpucloud.core import labels as labelling
from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import (
    AuthError,
    InvalidRequest,
    NotFound,
    OutOfCapacity,
    ProviderError,
    QuotaExceeded,
    RateLimited,
    Transient,
)
from pytest_gpucloud.core.wire import IpAddress, SafeId
from pytest_gpucloud.providers.base import Instance
from pytest_gpucloud.providers.host_keys import InjectedHostKey
from pytest_gpucloud.providers.rest import poll_ready
from pytest_gpucloud.providers.vendor_http import (
    VendorHttp,
    one_line,
    rate_limited,
)
from pytest_gpucloud.providers.vendors import Policy

BASE_URL = "https://cloud.lambda.ai/api/v1"
KEY_ENV = "LAMBDA_API_KEY"
SSH_USER = "ubuntu"
SSH_PORT = 22
LAUNCH_INTERVAL_S = 12.0
_LAUNCH_TRIES = 5

_TYPE_NAME = re.compile(r"gpu_([0-9]{1,2})x_([a-z0-9_]{1,30})")
_VRAM = re.compile(r"\(([0-9]{1,6}) GB")
_STATES: dict[str, str] = {
    "booting": "provisioning",
    "active": "running",
    "unhealthy": "failed",
    "terminating": "terminating",
    "terminated": "terminated",
    "preempted": "terminated",
}


class _Specs(BaseModel):
    gpus: int = Field(ge=0, le=64)


class _Type(BaseModel):
    name: str
    gpu_description: str = ""
    price_cents_per_hour: int = Field(ge=0)
    specs: _Specs


class _Region(BaseModel):
    name: str = Field(pattern=r"^[a-z0-9-]{1,32}$")


class _TypeEntry(BaseModel):
    instance_type: _Type
    regions_with_capacity_available: list[_Region]


class _Tag(BaseModel):
    key: str
    value: str


class _Instance(BaseModel):
    id: SafeId
    name: str | None = None
    ip: IpAddress | None = None
    status: Literal["booting", "active", "unhealthy", "terminating", "terminated", "preempted"]
    region: _Region
    instance_type: _Type
    tags: list[_Tag] = []
    ssh_key_names: list[str] = []
    # Not Lambda's (its machines take SSH on 22): the simulated cloud's, whose cannot.
    ssh_port: int | None = Field(default=None, ge=1, le=65535)


class _Key(BaseModel):
    id: str
    name: str


_TYPES: TypeAdapter[dict[str, _TypeEntry]] = TypeAdapter(dict[str, _TypeEntry])
_INSTANCE: TypeAdapter[_Instance] = TypeAdapter(_Instance)
_INSTANCES: TypeAdapter[list[_Instance]] = TypeAdapter(list[_Instance])
_KEY: TypeAdapter[_Key] = TypeAdapter(_Key)
_KEYS: TypeAdapter[list[_Key]] = TypeAdapter(list[_Key])


class LambdaProvider:
    """Lambda Cloud's on-demand instances; no spot, no server-side lifetime."""

    name = "lambda"
    simulated = False

    def __init__(
        self,
        base_url: str,
        api_key: str,
        policy: Policy,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = VendorHttp("Lambda", base_url, api_key, _error, transport=transport)
        self._policy = policy
        self._types: dict[tuple[str, int], str] = {}
        self._key: _Key | None = None
        self._key_lock = asyncio.Lock()
        self._launch_lock = asyncio.Lock()
        self._last_launch: float | None = None

    async def aclose(self) -> None:
        """Delete the session's SSH key from the account, then close."""
        try:
            if self._key is not None:
                with contextlib.suppress(NotFound):
                    await self._http.call("DELETE", f"/ssh-keys/{self._key.id}")
                self._key = None
        finally:
            await self._http.aclose()

    async def catalog(self) -> list[GpuType]:
        entries = self._parse(_TYPES, await self._data("GET", "/instance-types"), "types")
        gpus: dict[str, list[tuple[int, _TypeEntry]]] = {}
        for type_name, entry in entries.items():
            found = _TYPE_NAME.fullmatch(type_name)
            vram = _VRAM.search(entry.instance_type.gpu_description)
            count = entry.instance_type.specs.gpus
            if found is None or vram is None or count != int(found[1]) or count < 1:
                continue  # not a GPU type this plugin can name
            gpu = found[2].upper().replace("_", "-")
            self._types[(gpu, count)] = type_name
            gpus.setdefault(gpu, []).append((int(vram[1]), entry))
        catalog = []
        for gpu, found_entries in sorted(gpus.items()):
            regions = sorted(
                {r.name for _, e in found_entries for r in e.regions_with_capacity_available}
            )
            price = min(
                e.instance_type.price_cents_per_hour / 100 / e.instance_type.specs.gpus
                for _, e in found_entries
            )
            vram_gb = found_entries[0][0]
            catalog.append(GpuType(gpu, vram_gb, round(price, 6), bool(regions), tuple(regions)))
        return catalog

    async def create(
        self,
        offer: Offer,
        *,
        count: int,
        image: str,
        ssh_public_key: str,
        labels: dict[str, str],
        max_lifetime_s: int,
        client_token: str,
    ) -> Instance:
        type_name = self._types.get((offer.gpu.name, count))
        if type_name is None:
            counts = sorted(n for gpu, n in self._types if gpu == offer.gpu.name)
            raise InvalidRequest(
                f"Lambda has no instance type with {count} {offer.gpu.name} GPU(s) (it offers "
                f"{', '.join(map(str, counts)) or 'none'}); ask for one of those counts"
            )
        key = await self._session_key(ssh_public_key, labels)
        host_key = InjectedHostKey.new() if self._policy == "inject" else None
        body: dict[str, Any] = {
            "region_name": offer.region,
            "instance_type_name": type_name,
            "ssh_key_names": [key.name],
            "name": labelling.instance_name(labels),
            "tags": [{"key": k, "value": v} for k, v in sorted(labels.items())],
        }
        if host_key is not None:
            body["user_data"] = _cloud_init(host_key)
        data = await self._launch(body)
        ids = data.get("instance_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or len(ids) != 1 or not isinstance(ids[0], str):
            raise self._http.bad_answer("answered a launch without one instance id")
        return Instance(
            id=ids[0],
            gpu_type=offer.gpu.name,
            count=count,
            region=offer.region,
            price_per_hour=offer.price(count),
            status="provisioning",
            created_at=time.time(),
            labels=dict(labels),
            ssh_host_key=None if host_key is None else host_key.public_line,
            trust_first_host_key=self._policy == "tofu",
        )

    async def get(self, instance_id: str) -> Instance:
        found = await self._data("GET", f"/instances/{instance_id}")
        return self._instance(self._parse(_INSTANCE, found, "the instance"))

    async def wait_ready(self, instance: Instance, timeout: float) -> Instance:
        ready = await poll_ready(self.get, instance, timeout)
        # The pinned (injected) host key is this session's; the API announces none.
        return dataclasses.replace(ready, ssh_host_key=instance.ssh_host_key)

    async def delete(self, instance_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._data(
                "POST", "/instance-operations/terminate", body={"instance_ids": [instance_id]}
            )

    async def list_instances(self, labels: dict[str, str]) -> list[Instance]:
        found = self._parse(_INSTANCES, await self._data("GET", "/instances"), "instances")
        listed = [self._instance(i) for i in found]
        return [i for i in listed if labelling.selects(labels, i.labels)]

    async def delete_stale_keys(self, now: float) -> list[str]:
        """Delete the SSH keys of sessions past their expiry that no instance uses; return
        their names (for ``cleanup``)."""
        keys = self._parse(_KEYS, await self._data("GET", "/ssh-keys"), "ssh-keys")
        instances = self._parse(_INSTANCES, await self._data("GET", "/instances"), "instances")
        in_use = {name for i in instances for name in i.ssh_key_names}
        deleted = []
        for key in keys:
            expires = labelling.expires_at(labelling.from_name(key.name))
            if expires is not None and expires < now and key.name not in in_use:
                with contextlib.suppress(NotFound):
                    await self._http.call("DELETE", f"/ssh-keys/{key.id}")
                deleted.append(key.name)
        return deleted

    async def _session_key(self, public_key: str, labels: dict[str, str]) -> _Key:
        """The session's key, registered on the account at the first launch."""
        async with self._key_lock:
            if self._key is None:
                name = labelling.instance_name(labels)
                body = {"name": name, "public_key": public_key}
                try:
                    answer = await self._data("POST", "/ssh-keys", body=body, retry=False)
                    self._key = self._parse(_KEY, answer, "ssh-keys")
                except InvalidRequest:  # a retried registration that went through
                    keys = self._parse(_KEYS, await self._data("GET", "/ssh-keys"), "ssh-keys")
                    self._key = next((k for k in keys if k.name == name), None)
                    if self._key is None:
                        raise
            return self._key

    async def _launch(self, body: dict[str, Any]) -> Any:
        """One launch, in its turn: at most one every 12 s, so none draws a 429."""
        async with self._launch_lock:
            for attempt in range(_LAUNCH_TRIES):
                if self._last_launch is not None:
                    wait = self._last_launch + LAUNCH_INTERVAL_S - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                try:
                    return await self._data(
                        "POST", "/instance-operations/launch", body=body, retry=False
                    )
                except RateLimited as exc:  # refused, so nothing was made: wait and retry
                    if attempt == _LAUNCH_TRIES - 1:
                        raise
                    await asyncio.sleep(exc.retry_after)
                finally:
                    # Counted from the answer: the request arrived before it, however late
                    # it was sent.
                    self._last_launch = time.monotonic()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _data(self, method: str, path: str, *, body: Any = None, retry: bool = True) -> Any:
        answer = await self._http.call(method, path, body=body, retry=retry)
        if not isinstance(answer, dict) or "data" not in answer:
            raise self._http.bad_answer(f"answered {method} {path} without its data")
        return answer["data"]

    def _parse(self, adapter: TypeAdapter[Any], payload: Any, what: str) -> Any:
        try:
            return adapter.validate_python(payload)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise self._http.bad_answer(
                f"answered {what} with a bad value at {where}: {first['msg']}"
            ) from None

    def _instance(self, found: _Instance) -> Instance:
        tags = {tag.key: tag.value for tag in found.tags}
        gpus = max(1, found.instance_type.specs.gpus)
        name = _TYPE_NAME.fullmatch(found.instance_type.name)
        return Instance(
            id=found.id,
            gpu_type=name[2].upper().replace("_", "-") if name else found.instance_type.name,
            count=gpus,
            region=found.region.name,
            price_per_hour=found.instance_type.price_cents_per_hour / 100,
            status=_STATES[found.status],
            created_at=time.time(),  # Lambda does not say
            labels={**labelling.from_name(found.name), **tags},
            ip=found.ip,
            ssh_port=(found.ssh_port or SSH_PORT) if found.ip else None,
            ssh_user=SSH_USER,
            trust_first_host_key=self._policy == "tofu",
        )


def _cloud_init(host_key: InjectedHostKey) -> str:
    """cloud-init user data (JSON is YAML) that makes ``host_key`` the SSH host key."""
    config = {
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {
            "ed25519_private": host_key.private_openssh,
            "ed25519_public": host_key.public_line,
        },
    }
    return "#cloud-config\n" + json.dumps(config)


def _error(status: int, body: bytes, headers: httpx.Headers, what: str) -> ProviderError:
    """Lambda's ``{"error": {"code", "message", "suggestion"}}``, read by its code."""
    code, message = "", ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(body)["error"]
        code, message = str(error.get("code", "")), one_line(error.get("message", ""))
    said = f": {message}" if message else ""
    if status == 429:
        return rate_limited(what, headers, default=LAUNCH_INTERVAL_S if "launch" in what else 1.0)
    if status == 401 or code == "global/invalid-api-key":
        return AuthError(f"Lambda refused the API key ({what}, HTTP {status}); check {KEY_ENV}")
    if code == "instance-operations/launch/insufficient-capacity":
        return OutOfCapacity(f"Lambda is out of capacity{said}")
    if code == "global/quota-exceeded":
        return QuotaExceeded(
            f"Lambda refused {what}: the account's quota is used up{said}; ask Lambda's "
            "support to raise it, or lower --gpu-max-instances"
        )
    if code in ("global/account-inactive", "global/invalid-address"):
        return AuthError(f"Lambda refused {what} ({code}){said}; check the account")
    if status == 404 or code in ("global/object-does-not-exist", "global/not-found"):
        return NotFound(f"{what}: not found{said}")
    if status >= 500 or code.startswith("provider/"):
        return Transient(f"the Lambda API failed {what} (HTTP {status}){said}")
    return InvalidRequest(f"the Lambda API rejected {what} (HTTP {status}, {code}){said}")
