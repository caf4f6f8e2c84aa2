"""The ``runpod`` provider: RunPod's REST API v2 (``/v2``), key ``RUNPOD_API_KEY``.

- Catalog: ``GET /v2/catalog/gpus`` (secure-cloud prices, data centers as regions).
- A pod *is* the container of ``--gpu-image``: the runtime is ``none``. The session's public
  key goes in as ``PUBLIC_KEY`` (which RunPod's images' start script authorizes), ``22/tcp``
  is exposed, and readiness waits for ``ssh.direct``, not only ``RUNNING``.
- Host keys are injected: the pod's start command (``args``) installs a host key made here,
  passed in ``GPUCLOUD_SSH_HOST_KEY``, and runs the image's ``/start.sh``; the same command
  ends the container at the session's lifetime (a stopped pod bills no GPU).
- RunPod keeps no labels: a pod is named ``gpucloud-<session>-<expiry>``.
- No spot: REST v2 has no interruptible pods (only RunPod's GraphQL API has, with a bid).
- A create is never retried blindly (RunPod has no idempotency token); the session's
  end-of-run sweep finds a pod whose answer was lost, by its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import time
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, Field, ValidationError

from pytest_gpucloud.core import labels as labelling
from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import (
    AuthError,
    InvalidRequest,
    NotFound,
    OutOfCapacity,
    ProviderError,
    Transient,
)
from pytest_gpucloud.core.wire import IpAddress, SafeId
from pytest_gpucloud.providers.base import Instance
from pytest_gpucloud.providers.host_keys import InjectedHostKey
from pytest_gpucloud.providers.rest import poll_ready
from pytest_gpucloud.providers.vendor_http import VendorHttp, one_line, rate_limited
from pytest_gpucloud.providers.vendors import Policy

BASE_URL = "https://api.runpod.io/v2"
KEY_ENV = "RUNPOD_API_KEY"
HOST_KEY_ENV = "GPUCLOUD_SSH_HOST_KEY"
_NO_CAPACITY = "no longer any instances available"
_STATES = {
    "PROVISIONING": "provisioning",
    "STARTING": "provisioning",
    "RUNNING": "running",
    "EXITED": "failed",
    "ERROR": "failed",
    "TERMINATED": "terminated",
}


class _Price(BaseModel):
    secure: float | None = Field(default=None, ge=0)


class _DataCenter(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9-]{1,32}$")


class _CatalogGpu(BaseModel):
    id: str = Field(max_length=128)
    name: str
    memory: int = Field(ge=1)
    secure: bool = True
    price: _Price
    dataCenters: list[_DataCenter] = []


class _Catalog(BaseModel):
    gpus: list[_CatalogGpu]


class _Direct(BaseModel):
    host: IpAddress
    port: int = Field(ge=1, le=65535)
    username: str = Field(pattern=r"^[A-Za-z0-9._-]{1,32}$")


class _Ssh(BaseModel):
    direct: _Direct | None = None


class _PodGpu(BaseModel):
    id: str
    count: int = Field(ge=1, le=64)


class _Pod(BaseModel):
    id: SafeId
    name: str | None = None
    status: Literal["PROVISIONING", "STARTING", "RUNNING", "EXITED", "ERROR", "TERMINATED"]
    gpu: _PodGpu | None = None
    dataCenterId: str | None = None
    cost: float | None = Field(default=None, ge=0)
    ssh: _Ssh | None = None
    createdAt: datetime | None = None


class _Pods(BaseModel):
    pods: list[_Pod]


class RunPodProvider:
    """RunPod's secure-cloud pods, on demand."""

    name = "runpod"
    simulated = False

    def __init__(
        self,
        base_url: str,
        api_key: str,
        policy: Policy,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = VendorHttp("RunPod", base_url, api_key, _error, transport=transport)
        self._policy = policy
        self._names: dict[str, str] = {}  # GPU type name -> RunPod's GPU id

    async def aclose(self) -> None:
        await self._http.aclose()

    async def catalog(self) -> list[GpuType]:
        found = self._parse(_Catalog, await self._http.call("GET", "/catalog/gpus"), "the GPUs")
        catalog = []
        for gpu in found.gpus:
            name = "-".join(gpu.name.split())
            if gpu.price.secure is None or not gpu.secure or not _is_name(name):
                continue  # not offered on the secure cloud, or not a name a marker can use
            self._names[name] = gpu.id
            regions = tuple(sorted(dc.id for dc in gpu.dataCenters))
            catalog.append(GpuType(name, gpu.memory, gpu.price.secure, bool(regions), regions))
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
        gpu_id = self._names.get(offer.gpu.name)
        if gpu_id is None:
            raise InvalidRequest(f"RunPod's catalog has no GPU {offer.gpu.name}")
        host_key = InjectedHostKey.new() if self._policy == "inject" else None
        env = {"PUBLIC_KEY": ssh_public_key}
        if host_key is not None:
            env[HOST_KEY_ENV] = host_key.private_openssh
        body = {
            "name": labelling.instance_name(labels),
            "image": image,
            "gpu": {"id": gpu_id, "count": count},
            "cloud": "SECURE",
            "dataCenterIds": [offer.region],
            "env": env,
            "ports": ["22/tcp"],
            "args": start_command(max_lifetime_s),
        }
        answer = await self._http.call("POST", "/pods", body=body, retry=False)
        pod = self._instance(self._parse(_Pod, answer, "the new pod"))
        return dataclasses.replace(
            pod,
            gpu_type=offer.gpu.name,
            count=count,
            region=offer.region,
            price_per_hour=pod.price_per_hour or offer.price(count),
            labels=dict(labels),
            ssh_host_key=None if host_key is None else host_key.public_line,
        )

    async def get(self, instance_id: str) -> Instance:
        answer = await self._http.call("GET", f"/pods/{quote(instance_id, safe='')}")
        return self._instance(self._parse(_Pod, answer, "the pod"))

    async def wait_ready(self, instance: Instance, timeout: float) -> Instance:
        ready = await poll_ready(self.get, instance, timeout)
        # The pinned (injected) host key is this session's; the API announces none.
        return dataclasses.replace(ready, ssh_host_key=instance.ssh_host_key)

    async def delete(self, instance_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._http.call("DELETE", f"/pods/{quote(instance_id, safe='')}")

    async def list_instances(self, labels: dict[str, str]) -> list[Instance]:
        found = self._parse(_Pods, await self._http.call("GET", "/pods"), "the pods")
        listed = [self._instance(pod) for pod in found.pods]
        return [i for i in listed if labelling.selects(labels, i.labels)]

    def _parse(self, model: type[Any], payload: Any, what: str) -> Any:
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise self._http.bad_answer(
                f"answered {what} with a bad value at {where}: {first['msg']}"
            ) from None

    def _instance(self, pod: _Pod) -> Instance:
        direct = pod.ssh.direct if pod.ssh is not None else None
        gpu_name = next(
            (name for name, gpu_id in self._names.items() if pod.gpu and gpu_id == pod.gpu.id),
            pod.gpu.id if pod.gpu else "?",
        )
        return Instance(
            id=pod.id,
            gpu_type=gpu_name,
            count=pod.gpu.count if pod.gpu else 1,
            region=pod.dataCenterId or "?",
            price_per_hour=pod.cost or 0.0,
            status=_STATES[pod.status],
            created_at=pod.createdAt.timestamp() if pod.createdAt else time.time(),
            labels=labelling.from_name(pod.name),
            ip=direct.host if direct else None,
            ssh_port=direct.port if direct else None,
            ssh_user=direct.username if direct else None,
            trust_first_host_key=self._policy == "tofu",
        )


def start_command(lifetime_s: int) -> str:
    """The pod's start: install the injected host key (if any), run the image's own start
    script (sshd with PUBLIC_KEY) beside it, and end the container at the session's lifetime:
    its first process is a ``sleep`` of that long (a signal could not end it: the kernel
    shields a container's first process from signals it has no handler for)."""
    script = (
        f'if [ -n "${HOST_KEY_ENV}" ]; then mkdir -p /etc/ssh && '
        f'printf "%s\\n" "${HOST_KEY_ENV}" > /etc/ssh/ssh_host_ed25519_key && '
        "chmod 600 /etc/ssh/ssh_host_ed25519_key && "
        "ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key > /etc/ssh/ssh_host_ed25519_key.pub; "
        f"fi; unset {HOST_KEY_ENV}; /start.sh & exec sleep {int(lifetime_s)}"
    )
    return f"bash -c {shlex.quote(script)}"


def _is_name(name: str) -> bool:
    return bool(name) and len(name) <= 32 and all(c.isalnum() or c in "._-" for c in name)


def _error(status: int, body: bytes, headers: httpx.Headers, what: str) -> ProviderError:
    """RFC 9457 problem details (``title``, ``status``, ``detail``)."""
    detail = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        detail = one_line(json.loads(body).get("detail", ""))
    said = f": {detail}" if detail else ""
    if status == 429:
        return rate_limited(what, headers)
    if status in (401, 403):
        return AuthError(f"RunPod refused the API key ({what}, HTTP {status}); check {KEY_ENV}")
    if _NO_CAPACITY in detail:
        return OutOfCapacity(f"RunPod is out of capacity{said}")
    if status == 404:
        return NotFound(f"{what}: not found{said}")
    if status >= 500:
        return Transient(f"the RunPod API failed {what} (HTTP {status}){said}")
    return InvalidRequest(f"the RunPod API rejected {what} (HTTP {status}){said}")
