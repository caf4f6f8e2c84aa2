"""Lambda Cloud's API (``/api/v1``, spec 1.10.0) over the simulated cloud.

What it keeps of the vendor (sources in the project's vendor notes and tests):

- ``GET /instance-types`` answers ``data`` as an object keyed by type name, prices in cents
  per hour, ``regions_with_capacity_available`` empty where a type has none;
- a launch takes exactly one SSH key registered on the account by name, ``quantity`` at most
  1, ``name``, ``tags`` and cloud-init ``user_data`` (its ``ssh_keys`` set the host key), and
  answers ``instance_ids``; launches come at most once every 12 s, or 429;
- states ``booting``, ``active``, ``unhealthy``, ``terminating``, ``terminated``;
- errors ``{"error": {"code", "message", "suggestion"}}`` with the documented codes (a
  capacity refusal is a 400); a 429's body is undocumented, so none is sent.

One deviation: a real instance takes SSH on port 22, a simulated machine on a port of its
own, which answers name as ``ssh_port`` (a field Lambda does not have).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.core.wire import CreateInstanceRequest, GpuTypeModel
from pytest_gpucloud.sim.cloud import ApiError, SimInstance
from pytest_gpucloud.sim.desk import Desk, parse

PREFIX = "/api/v1"
SSH_USER = "ubuntu"
LAUNCH_INTERVAL_S = 12.0
COUNTS = (1, 2, 4, 8)
# Lambda keeps no lifetime: the sim's reaper is given a week.
_NO_LIFETIME_S = 7 * 24 * 3600

_CODES: dict[str, tuple[int, str, str]] = {
    "out_of_capacity": (
        400,
        "instance-operations/launch/insufficient-capacity",
        "Not enough capacity to fulfill launch request.",
    ),
    "quota_exceeded": (400, "global/quota-exceeded", "Quota exceeded."),
    "unauthorized": (401, "global/invalid-api-key", "API key was invalid, expired, or deleted."),
    "not_found": (404, "global/object-does-not-exist", "Specified instance does not exist."),
    "invalid_request": (400, "global/invalid-parameters", "Invalid request data."),
    "internal": (500, "global/internal-error", "An internal server error occurred."),
}
_STATES = {
    "provisioning": "booting",
    "running": "active",
    "failed": "unhealthy",
    "terminating": "terminating",
    "terminated": "terminated",
}


class _Tag(BaseModel):
    key: str = Field(pattern=r"^[a-z][a-z0-9-:]+$", max_length=55)
    value: str = Field(max_length=128)


class _Launch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    region_name: str
    instance_type_name: str
    ssh_key_names: list[str]
    file_system_names: list[str] = []
    name: str | None = Field(default=None, max_length=64)
    tags: list[_Tag] = []
    user_data: str | None = Field(default=None, max_length=1 << 20)
    quantity: int | None = None  # not in the spec; an example of the vendor's still sends 1


class _Terminate(BaseModel):
    instance_ids: list[str]


class _NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    public_key: str


class LambdaDialect:
    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        self.cloud = desk.cloud
        self.keys: dict[str, dict[str, str]] = {}
        self.names: dict[str, str] = {}
        self.tags: dict[str, list[dict[str, str]]] = {}
        self.keys_of: dict[str, str] = {}  # instance id -> the name of its SSH key
        self._last_launch: float | None = None

    def routes(self) -> list[Route]:
        return [
            Route(f"{PREFIX}/instance-types", self.instance_types, methods=["GET"]),
            Route(f"{PREFIX}/instance-operations/launch", self.launch, methods=["POST"]),
            Route(f"{PREFIX}/instance-operations/terminate", self.terminate, methods=["POST"]),
            Route(f"{PREFIX}/instances", self.list_instances, methods=["GET"]),
            Route(f"{PREFIX}/instances/{{id}}", self.get_instance, methods=["GET"]),
            Route(f"{PREFIX}/ssh-keys", self.list_keys, methods=["GET"]),
            Route(f"{PREFIX}/ssh-keys", self.add_key, methods=["POST"]),
            Route(f"{PREFIX}/ssh-keys/{{id}}", self.delete_key, methods=["DELETE"]),
        ]

    def render(self, error: ApiError) -> Response:
        if error.code == "rate_limited":
            headers = {} if error.retry_after is None else {"Retry-After": str(error.retry_after)}
            return Response(status_code=429, headers=headers)
        status, code, message = _CODES[error.code]
        body = {"error": {"code": code, "message": message}}
        if error.code == "invalid_request":
            body["error"]["message"] = error.message[:1000]
        return JSONResponse(body, status)

    async def instance_types(self, request: Request) -> Response:
        return await self.desk.answer("gpu_types", None, lambda: {"data": self._types()})

    async def launch(self, request: Request) -> Response:
        now = time.monotonic()
        last, self._last_launch = self._last_launch, now
        if last is not None and now - last < LAUNCH_INTERVAL_S:
            raise ApiError(429, "rate_limited", "launch rate limit", retry_after=12)
        body = parse(_Launch, await request.body())
        if body.quantity is not None and body.quantity > 1:
            raise ApiError(400, "invalid_request", "Requested too many instances.")
        if len(body.ssh_key_names) != 1:
            raise ApiError(400, "invalid_request", "exactly one SSH key must be specified")
        key = next((k for k in self.keys.values() if k["name"] == body.ssh_key_names[0]), None)
        gpu, count = self._type(body.instance_type_name)
        if key is None or gpu is None:
            raise ApiError(404, "not_found", "no such SSH key or instance type")
        create = CreateInstanceRequest(
            gpu_type=gpu.name,
            count=count,
            image="lambda-stack",
            region=body.region_name,
            ssh_public_key=key["public_key"],
            max_lifetime_s=_NO_LIFETIME_S,
            client_token=uuid.uuid4().hex,
        )

        def launch() -> dict[str, Any]:
            instance = self.cloud.create(
                create, ssh_user=SSH_USER, host_key=_injected_host_key(body.user_data)
            )
            self.names[instance.id] = body.name or ""
            self.tags[instance.id] = [tag.model_dump() for tag in body.tags]
            self.keys_of[instance.id] = key["name"]
            return {"data": {"instance_ids": [instance.id]}}

        return await self.desk.answer("create", gpu.name, launch)

    async def list_instances(self, request: Request) -> Response:
        def listing() -> dict[str, Any]:
            live = [i for i in self.cloud.live({}) if i.id in self.names]
            return {"data": [self._instance(i) for i in live]}

        return await self.desk.answer("list", None, listing)

    async def get_instance(self, request: Request) -> Response:
        instance_id = request.path_params["id"]
        return await self.desk.answer(
            "get",
            self.desk.gpu_type_of(instance_id),
            lambda: {"data": self._instance(self._get(instance_id))},
        )

    async def terminate(self, request: Request) -> Response:
        body = parse(_Terminate, await request.body())

        def terminate() -> dict[str, Any]:
            ended = []
            for instance_id in body.instance_ids:
                self._get(instance_id)
                self.cloud.delete(instance_id)
                ended.append(self._instance(self._get(instance_id)))
            return {"data": {"terminated_instances": ended}}

        gpu_type = self.desk.gpu_type_of(body.instance_ids[0]) if body.instance_ids else None
        return await self.desk.answer("delete", gpu_type, terminate)

    async def list_keys(self, request: Request) -> Response:
        return JSONResponse({"data": list(self.keys.values())})

    async def add_key(self, request: Request) -> Response:
        body = parse(_NewKey, await request.body())
        if any(k["name"] == body.name for k in self.keys.values()):
            raise ApiError(400, "invalid_request", f"an SSH key named {body.name!r} exists")
        try:
            asyncssh.import_public_key(body.public_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ApiError(400, "invalid_request", f"public_key: {exc}") from None
        key_id = secrets.token_hex(16)
        self.keys[key_id] = {"id": key_id, "name": body.name, "public_key": body.public_key}
        return JSONResponse({"data": self.keys[key_id]})

    async def delete_key(self, request: Request) -> Response:
        if self.keys.pop(request.path_params["id"], None) is None:
            body = {"code": "global/not-found", "message": "The requested resource was not found."}
            return JSONResponse({"error": body}, 404)
        return JSONResponse({"data": {}})

    def _get(self, instance_id: str) -> SimInstance:
        instance = self.cloud.instances.get(instance_id)
        if instance is None or instance_id not in self.names:
            raise ApiError(404, "not_found", f"no instance {instance_id!r}")
        return instance

    def _types(self) -> dict[str, Any]:
        return {
            _type_name(gpu, n): {
                "instance_type": _instance_type(gpu, n),
                "regions_with_capacity_available": [
                    {"name": region, "description": region} for region in gpu.regions
                ]
                if gpu.available
                else [],
            }
            for gpu in self.cloud.config.catalog
            for n in COUNTS
        }

    def _type(self, name: str) -> tuple[GpuTypeModel | None, int]:
        for gpu in self.cloud.config.catalog:
            for n in COUNTS:
                if _type_name(gpu, n) == name:
                    return gpu, n
        return None, 0

    def _instance(self, instance: SimInstance) -> dict[str, Any]:
        gpu, count = self._type(_type_name_of(instance))
        assert gpu is not None
        answer: dict[str, Any] = {
            "id": instance.id,
            "name": self.names[instance.id],
            "status": _STATES[instance.status],
            "ssh_key_names": [self.keys_of[instance.id]],
            "file_system_names": [],
            "region": {"name": instance.region, "description": instance.region},
            "instance_type": _instance_type(gpu, count),
            "actions": {},
            "tags": self.tags[instance.id],
        }
        if instance.address_shown:
            answer.update(ip="127.0.0.1", hostname="127.0.0.1", ssh_port=instance.ssh_port)
        return answer


def _type_name(gpu: GpuTypeModel, count: int) -> str:
    return f"gpu_{count}x_{gpu.name.lower().replace('-', '_')}"


def _type_name_of(instance: SimInstance) -> str:
    request = instance.request
    return f"gpu_{request.count}x_{request.gpu_type.lower().replace('-', '_')}"


def _instance_type(gpu: GpuTypeModel, count: int) -> dict[str, Any]:
    return {
        "name": _type_name(gpu, count),
        "description": f"{count}x {gpu.name} ({gpu.vram_gb} GB)",
        "gpu_description": f"{gpu.name} ({gpu.vram_gb} GB)",
        "price_cents_per_hour": round(gpu.price_per_hour * count * 100),
        "specs": {"vcpus": 8 * count, "memory_gib": 64 * count, "storage_gib": 512, "gpus": count},
    }


def _injected_host_key(user_data: str | None) -> asyncssh.SSHKey | None:
    """The ed25519 host key cloud-init's ``ssh_keys`` sets, from user data in its JSON form
    (YAML's subset); None where there is none (the machine makes its own)."""
    if not user_data or not user_data.startswith("#cloud-config\n"):
        return None
    try:
        config = json.loads(user_data.partition("\n")[2])
        return asyncssh.import_private_key(config["ssh_keys"]["ed25519_private"])
    except (ValueError, KeyError, TypeError, asyncssh.KeyImportError):
        return None
