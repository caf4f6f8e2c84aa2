"""RunPod's REST API v2 (``/v2``) over the simulated cloud: pods and the GPU catalog.

What it keeps of the vendor (spec ``api-reference-v2/openapi.json``, version 2.0.0):

- ``POST /pods`` takes ``name``, ``image``, ``gpu: {id, count}``, ``cloud``,
  ``dataCenterIds``, ``env``, ``ports`` and ``args``, and answers 201 with the pod;
- the SSH key goes in as the ``PUBLIC_KEY`` environment variable (without it no key logs
  in; ``startSsh`` would add the account's keys, of which the sim has none);
  ``ssh.direct`` exists only with ``22/tcp`` among the ports, and only once the address
  does, which can be after the pod reports ``RUNNING`` (fault ``address_late``); the user
  is ``root``;
- a pod is a container: the machine behind it is the container itself;
- states ``PROVISIONING``, ``STARTING``, ``RUNNING``, ``EXITED``, ``ERROR``, ``TERMINATED``;
- errors are RFC 9457 ``application/problem+json`` (``title``, ``status``, ``detail``); no
  capacity is a 400 whose detail says so; 429 comes with ``Retry-After``.

The sim honours one environment variable of this project's start command,
``GPUCLOUD_SSH_HOST_KEY``: the host key the command installs before the image's own start.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.core.wire import CreateInstanceRequest, GpuTypeModel
from pytest_gpucloud.sim.cloud import ApiError, SimInstance
from pytest_gpucloud.sim.desk import Desk, parse

PREFIX = "/v2"
SSH_USER = "root"
HOST_KEY_ENV = "GPUCLOUD_SSH_HOST_KEY"
NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
_NO_LIFETIME_S = 7 * 24 * 3600
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
_STATUS = {
    "out_of_capacity": 400,
    "quota_exceeded": 403,
    "unauthorized": 401,
    "not_found": 404,
    "rate_limited": 429,
}
_STATES = {
    "provisioning": "PROVISIONING",
    "running": "RUNNING",
    "failed": "ERROR",
    "terminating": "TERMINATED",
    "terminated": "TERMINATED",
}


class _Gpu(BaseModel):
    id: str
    count: int = Field(default=1, ge=1)


class _CreatePod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    image: str = Field(min_length=1)
    gpu: _Gpu
    cloud: Literal["SECURE", "COMMUNITY"] = "SECURE"
    dataCenterIds: list[str] = []
    env: dict[str, str] = {}
    ports: list[str] = []
    args: str = ""
    disk: int | None = None


class RunPodDialect:
    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        self.cloud = desk.cloud
        self.pods: dict[str, _CreatePod] = {}

    def routes(self) -> list[Route]:
        return [
            Route(f"{PREFIX}/catalog/gpus", self.gpus, methods=["GET"]),
            Route(f"{PREFIX}/pods", self.create, methods=["POST"]),
            Route(f"{PREFIX}/pods", self.list_pods, methods=["GET"]),
            Route(f"{PREFIX}/pods/{{id}}", self.get_pod, methods=["GET"]),
            Route(f"{PREFIX}/pods/{{id}}", self.delete_pod, methods=["DELETE"]),
        ]

    def render(self, error: ApiError) -> Response:
        status = _STATUS.get(error.code, error.status)
        detail = NO_CAPACITY if error.code == "out_of_capacity" else error.message
        body = {"title": _TITLES.get(status, "Error"), "status": status, "detail": detail}
        headers = {} if error.retry_after is None else {"Retry-After": str(error.retry_after)}
        if status == 429 and not headers:
            headers["Retry-After"] = "1"
        return JSONResponse(body, status, headers=headers, media_type="application/problem+json")

    async def gpus(self, request: Request) -> Response:
        return await self.desk.answer(
            "gpu_types", None, lambda: {"gpus": [_catalog_entry(g) for g in self._catalog()]}
        )

    async def create(self, request: Request) -> Response:
        body = parse(_CreatePod, await request.body())
        gpu = next((g for g in self._catalog() if _gpu_id(g) == body.gpu.id), None)
        if gpu is None:
            raise ApiError(400, "invalid_request", f"unknown gpu id {body.gpu.id!r}")
        # Without PUBLIC_KEY the pod runs, but no key logs in: one that nobody holds.
        public_key = body.env.get("PUBLIC_KEY") or _nobodys_key()
        region = body.dataCenterIds[0] if body.dataCenterIds else None
        if region is not None and region not in gpu.regions:
            raise ApiError(400, "out_of_capacity", NO_CAPACITY)
        create = CreateInstanceRequest(
            gpu_type=gpu.name,
            count=body.gpu.count,
            image=body.image,
            region=region,
            ssh_public_key=public_key,
            max_lifetime_s=_NO_LIFETIME_S,
            client_token=uuid.uuid4().hex,
        )

        def made() -> dict[str, Any]:
            host_key = _host_key(body.env.get(HOST_KEY_ENV))
            instance = self.cloud.create(create, ssh_user=SSH_USER, host_key=host_key)
            self.pods[instance.id] = body
            return self._pod(instance)

        return await self.desk.answer("create", gpu.name, made, status=201)

    async def list_pods(self, request: Request) -> Response:
        def listing() -> dict[str, Any]:
            live = [i for i in self.cloud.live({}) if i.id in self.pods]
            return {"pods": [self._pod(i) for i in live]}

        return await self.desk.answer("list", None, listing)

    async def get_pod(self, request: Request) -> Response:
        pod_id = request.path_params["id"]
        return await self.desk.answer(
            "get", self.desk.gpu_type_of(pod_id), lambda: self._pod(self._get(pod_id))
        )

    async def delete_pod(self, request: Request) -> Response:
        pod_id = request.path_params["id"]

        def delete() -> None:
            self._get(pod_id)
            self.cloud.delete(pod_id)

        return await self.desk.answer("delete", self.desk.gpu_type_of(pod_id), delete, 204)

    def _catalog(self) -> list[GpuTypeModel]:
        return self.cloud.config.catalog

    def _get(self, pod_id: str) -> SimInstance:
        instance = self.cloud.instances.get(pod_id)
        if instance is None or pod_id not in self.pods or instance.status == "terminated":
            raise ApiError(404, "not_found", "resource not found")
        return instance

    def _pod(self, instance: SimInstance) -> dict[str, Any]:
        body = self.pods[instance.id]
        direct = None
        if instance.address_shown and "22/tcp" in body.ports:
            direct = {"host": "127.0.0.1", "port": instance.ssh_port, "username": SSH_USER}
        return {
            "id": instance.id,
            "name": body.name,
            "image": body.image,
            "args": body.args,
            "ports": body.ports,
            "env": {k: v for k, v in body.env.items() if k != HOST_KEY_ENV},
            "status": _STATES[instance.status],
            "gpu": {"id": body.gpu.id, "count": body.gpu.count},
            "cloud": body.cloud,
            "dataCenterId": instance.region,
            "cost": instance.price_per_hour,
            "ssh": {"proxy": None, "direct": direct},
            "createdAt": instance.created_at.isoformat(),
        }


def _gpu_id(gpu: GpuTypeModel) -> str:
    return f"NVIDIA {gpu.name}"


def _catalog_entry(gpu: GpuTypeModel) -> dict[str, Any]:
    return {
        "id": _gpu_id(gpu),
        "name": gpu.name,
        "manufacturer": "NVIDIA",
        "memory": gpu.vram_gb,
        "secure": True,
        "community": False,
        "price": {"secure": gpu.price_per_hour, "community": None},
        "maxCount": {"secure": 8, "community": 0},
        "availability": "HIGH" if gpu.available else "NONE",
        "dataCenters": [
            {"id": region, "name": region, "availability": "HIGH"} for region in gpu.regions
        ],
    }


def _nobodys_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _host_key(text: str | None) -> asyncssh.SSHKey | None:
    if not text:
        return None
    try:
        return asyncssh.import_private_key(text)
    except (asyncssh.KeyImportError, ValueError):
        return None
