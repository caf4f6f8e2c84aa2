"""Lyceum's API (``/api/v2/external``) over the simulated cloud: VMs, availability, pricing.

What it keeps of the vendor (its docs, its CLI 1.2.2, and live captures of a third-party
adapter; the project's vendor notes name each source):

- ``POST /vms/create`` takes ``user_public_key``, ``hardware_profile``, ``instance_type``
  (``on-demand`` or ``spot``), ``instance_specs.gpu_count`` (0 silently becomes 1; a
  top-level ``gpu_count`` is ignored) and ``display_name``; the server makes ``name``;
- ``vm_id`` comes in two formats (32 hex digits, or a dashed UUID);
- ``ready`` can come with a null ``ip_address`` (fault ``address_late``), and an address
  can carry a ``:port``; the SSH user is ``lyceum``;
- ``/vms/list`` includes terminated VMs; ``/pricing`` prices are strings, keyed by
  ``applies_to``; ``/vms/availability`` lists per-variant prices and capacity;
- no capacity is a 500 "could not be provisioned"; errors are ``{"detail": ...}``, 422 with
  FastAPI's validation list; a spot VM can be preempted (fault ``preempt``).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pytest_gpucloud.core.wire import CreateInstanceRequest, GpuTypeModel
from pytest_gpucloud.sim.cloud import ApiError, SimInstance
from pytest_gpucloud.sim.desk import Desk, parse

PREFIX = "/api/v2/external"
SSH_USER = "lyceum"
NO_CAPACITY = "The instance could not be provisioned right now. Please try again in a moment."
SPOT_SHARE = 0.4
COUNTS = [1, 2, 4, 8]
_NO_LIFETIME_S = 7 * 24 * 3600
_DETAILS: dict[str, tuple[int, str]] = {
    "out_of_capacity": (500, NO_CAPACITY),
    "quota_exceeded": (402, "Insufficient credits"),
    "unauthorized": (401, "Invalid API key"),
    "not_found": (404, "VM not found"),
    "rate_limited": (429, "Too many requests"),
    "internal": (500, "Internal server error"),
}
_STATES = {
    "provisioning": "provisioning",
    "running": "ready",
    "failed": "error",
    "terminating": "terminated",
    "terminated": "terminated",
}


class _Specs(BaseModel):
    gpu_count: int = Field(default=1, ge=0, le=8)


class _Create(BaseModel):
    user_public_key: str
    hardware_profile: str
    instance_type: Literal["on-demand", "spot"] = "on-demand"
    instance_specs: _Specs = _Specs()
    display_name: str | None = Field(default=None, max_length=128)


class LyceumDialect:
    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        self.cloud = desk.cloud
        self.vms: dict[str, _Create] = {}
        self._made = 0

    def routes(self) -> list[Route]:
        return [
            Route(f"{PREFIX}/vms/availability", self.availability, methods=["GET"]),
            Route(f"{PREFIX}/pricing", self.pricing, methods=["GET"]),
            Route(f"{PREFIX}/vms/create", self.create, methods=["POST"]),
            Route(f"{PREFIX}/vms/list", self.list_vms, methods=["GET"]),
            Route(f"{PREFIX}/vms/{{id}}/status", self.status, methods=["GET"]),
            Route(f"{PREFIX}/vms/{{id}}", self.delete, methods=["DELETE"]),
        ]

    def render(self, error: ApiError) -> Response:
        if error.code == "invalid_request" and error.status == 422:
            detail: Any = [{"loc": ["body"], "msg": error.message, "type": "value_error"}]
            return JSONResponse({"detail": detail}, 422)
        status, text = _DETAILS.get(error.code, (error.status, error.message))
        headers = {} if error.retry_after is None else {"Retry-After": str(error.retry_after)}
        return JSONResponse({"detail": text}, status, headers=headers)

    async def availability(self, request: Request) -> Response:
        def variants() -> dict[str, Any]:
            found = [
                {
                    "hardware_profile": profile,
                    "instance_type": kind,
                    "price_per_hour": price,
                    "allowed_gpus_per_instance": COUNTS,
                    "available_gpus_per_instance": COUNTS if gpu.available else [],
                }
                for profile, gpu in self._profiles().items()
                for kind, price in _prices(gpu).items()
            ]
            return {"available_instance_variants": found}

        return await self.desk.answer("gpu_types", None, variants)

    async def pricing(self, request: Request) -> Response:
        prices = [
            {
                "meter_slug": "vm_running",
                "resource": "vm",
                "applies_to": {"hardware_profile": f"{kind}.{profile}.{n}x"},
                "unit": "second",
                "unit_price": f"{price * n / 3600:.8f}",
                "unit_price_per_hour": f"{price * n:.6f}",
            }
            for profile, gpu in self._profiles().items()
            for kind, price in _prices(gpu).items()
            for n in COUNTS
        ]
        return JSONResponse({"prices": prices})

    async def create(self, request: Request) -> Response:
        body = parse(_Create, await request.body())
        profiles = self._profiles()
        gpu = profiles.get(body.hardware_profile)
        if gpu is None:
            valid = ", ".join(sorted(profiles))
            raise ApiError(
                400,
                "invalid_request",
                f"Unknown hardware_profile '{body.hardware_profile}'. Valid options: {valid}",
            )
        if not gpu.available:
            raise ApiError(500, "out_of_capacity", NO_CAPACITY)
        create = CreateInstanceRequest(
            gpu_type=gpu.name,
            count=max(1, body.instance_specs.gpu_count),  # 0 becomes one billed GPU
            image="lyceum-vm",
            region=gpu.regions[0],
            ssh_public_key=body.user_public_key,
            max_lifetime_s=_NO_LIFETIME_S,
            client_token=uuid.uuid4().hex,
        )

        def made() -> dict[str, Any]:
            instance = self.cloud.create(create, ssh_user=SSH_USER)
            self._made += 1
            vm_id = uuid.uuid4().hex if self._made % 2 else str(uuid.uuid4())  # two formats
            self.cloud.instances[vm_id] = self.cloud.instances.pop(instance.id)
            instance.id = vm_id
            self.vms[vm_id] = body
            answer = self._vm(instance)
            answer.update(hardware_profile=None, gpu_count=None)  # as the create answers
            answer["created_at"] = instance.created_at.replace(tzinfo=None).isoformat()
            return answer

        return await self.desk.answer("create", gpu.name, made)

    async def list_vms(self, request: Request) -> Response:
        def listing() -> dict[str, Any]:
            vms = [self._vm(i) for i in self.cloud.instances.values() if i.id in self.vms]
            return {"vms": vms, "total": len(vms)}

        return await self.desk.answer("list", None, listing)

    async def status(self, request: Request) -> Response:
        vm_id = request.path_params["id"]
        return await self.desk.answer(
            "get", self.desk.gpu_type_of(vm_id), lambda: self._vm(self._get(vm_id))
        )

    async def delete(self, request: Request) -> Response:
        vm_id = request.path_params["id"]

        def delete() -> dict[str, Any]:
            self._get(vm_id)
            self.cloud.delete(vm_id)
            return {
                "vm_id": vm_id,
                "status": "terminated",
                "message": f"VM {vm_id} has been terminated",
            }

        return await self.desk.answer("delete", self.desk.gpu_type_of(vm_id), delete)

    def _profiles(self) -> dict[str, GpuTypeModel]:
        """Hardware profiles by name: each GPU family of the catalog once (``a100``)."""
        profiles: dict[str, GpuTypeModel] = {}
        for gpu in self.cloud.config.catalog:
            profiles.setdefault(gpu.name.split("-")[0].lower(), gpu)
        return profiles

    def _get(self, vm_id: str) -> SimInstance:
        instance = self.cloud.instances.get(vm_id)
        if instance is None or vm_id not in self.vms:
            raise ApiError(404, "not_found", "VM not found")
        return instance

    def _vm(self, instance: SimInstance) -> dict[str, Any]:
        body = self.vms[instance.id]
        address = None
        if instance.address_shown:
            address = f"127.0.0.1:{instance.ssh_port}"
        count = instance.request.count
        return {
            "vm_id": instance.id,
            "status": _STATES[instance.status],
            "ip_address": address,
            "created_at": instance.created_at.isoformat(),
            "instance_specs": {"gpu_type": body.hardware_profile, "gpu_count": count},
            "hardware_profile": body.hardware_profile,
            "gpu_count": count,
            "instance_type": body.instance_type,
            "name": f"hyd-production-vm-{instance.id[:20]}",
            "display_name": body.display_name,
            "billed": 0.0,
        }


def _prices(gpu: GpuTypeModel) -> dict[str, float]:
    return {"on-demand": gpu.price_per_hour, "spot": round(gpu.price_per_hour * SPOT_SHARE, 4)}
