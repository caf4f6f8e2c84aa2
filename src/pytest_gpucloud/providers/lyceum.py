"""The ``lyceum`` provider: Lyceum's API (``/api/v2/external``), key ``LYCEUM_API_KEY``.

- Catalog: ``GET /vms/availability``'s ``available_instance_variants`` (a price per GPU and
  hour, and capacity, for each hardware profile on demand and on spot). ``/pricing`` is not
  read: its sources disagree on the key that holds the profile, and its prices are strings.
  The API says no GPU memory: it comes from :data:`VRAM_GB`, the smallest memory each
  model ships with, so a ``vram`` request is never served by less.
- A create sends ``instance_type`` (``spot`` for a spot offer), ``instance_specs.gpu_count``
  (never 0: that silently becomes one billed GPU) and ``display_name``
  (``gpucloud-<session>-<expiry>``: Lyceum has no labels and makes ``name`` itself).
- ``ready`` may come with a null address, and an address may carry ``:port``: readiness
  waits for the address. The SSH user is ``lyceum``. ``vm_id`` is opaque.
- No capacity is an HTTP 500 "could not be provisioned": out of capacity, not a fault.
- Host keys: Lyceum neither takes one nor announces one, so the policy is ``tofu``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
from datetime import datetime, timezone
from typing import Any
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
    QuotaExceeded,
    Transient,
)
from pytest_gpucloud.providers.base import Instance
from pytest_gpucloud.providers.rest import poll_ready
from pytest_gpucloud.providers.vendor_http import VendorHttp, one_line, rate_limited
from pytest_gpucloud.providers.vendors import Policy

BASE_URL = "https://api.lyceum.technology/api/v2/external"
KEY_ENV = "LYCEUM_API_KEY"
SSH_USER = "lyceum"
# Lyceum's API names no region: its machines are in the EU.
REGION = "eu"
# GB of the smallest memory each model ships with (NVIDIA's data sheets).
VRAM_GB = {"l40s": 48, "a100": 40, "h100": 80, "h200": 141, "b200": 180, "b300": 288}
_NO_CAPACITY = "could not be provisioned"
_STATES = {
    "pending": "provisioning",
    "provisioning": "provisioning",
    "ready": "running",
    "running": "running",
    "failed": "failed",
    "error": "failed",
    "stopped": "terminated",
    "terminated": "terminated",
}


class _Variant(BaseModel):
    hardware_profile: str = Field(pattern=r"^[a-z0-9._-]{1,32}$")
    instance_type: str
    price_per_hour: float = Field(ge=0)  # a number in captures; a numeric string also reads
    available_gpus_per_instance: list[int] = []


class _Availability(BaseModel):
    available_instance_variants: list[_Variant]


class _Specs(BaseModel):
    gpu_type: str | None = None
    gpu_count: int | None = Field(default=None, ge=0, le=64)


class _Vm(BaseModel):
    vm_id: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    status: str = Field(max_length=32)
    ip_address: str | None = Field(default=None, max_length=64)
    created_at: datetime | None = None
    instance_specs: _Specs = _Specs()
    instance_type: str | None = None
    display_name: str | None = None


class _Vms(BaseModel):
    vms: list[_Vm]


class LyceumProvider:
    """Lyceum's VMs, on demand and on spot."""

    name = "lyceum"
    simulated = False

    def __init__(
        self,
        base_url: str,
        api_key: str,
        policy: Policy,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = VendorHttp("Lyceum", base_url, api_key, _error, transport=transport)
        self._policy = policy
        self._prices: dict[tuple[str, bool], float] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def catalog(self) -> list[GpuType]:
        found = self._parse(
            _Availability, await self._http.call("GET", "/vms/availability"), "availability"
        )
        profiles: dict[str, dict[str, _Variant]] = {}
        for variant in found.available_instance_variants:
            profiles.setdefault(variant.hardware_profile, {})[variant.instance_type] = variant
        catalog = []
        for profile, variants in sorted(profiles.items()):
            on_demand, spot = variants.get("on-demand"), variants.get("spot")
            vram = VRAM_GB.get(profile)
            if on_demand is None or vram is None:
                continue  # a profile this provider cannot describe
            available = bool(on_demand.available_gpus_per_instance) or bool(
                spot and spot.available_gpus_per_instance
            )
            self._prices[(profile.upper(), False)] = on_demand.price_per_hour
            if spot is not None:
                self._prices[(profile.upper(), True)] = spot.price_per_hour
            catalog.append(
                GpuType(
                    profile.upper(),
                    vram,
                    on_demand.price_per_hour,
                    available,
                    (REGION,),
                    spot.price_per_hour if spot is not None else None,
                )
            )
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
        if count < 1:  # Lyceum would bill one GPU for a 0
            raise InvalidRequest(f"a Lyceum VM needs at least one GPU, not {count}")
        body = {
            "user_public_key": ssh_public_key,
            "hardware_profile": offer.gpu.name.lower(),
            "instance_type": "spot" if offer.spot else "on-demand",
            "instance_specs": {"gpu_count": count},
            "display_name": labelling.instance_name(labels),
        }
        answer = await self._http.call("POST", "/vms/create", body=body, retry=False)
        made = self._instance(self._parse(_Vm, answer, "the new VM"))
        return Instance(
            id=made.id,
            gpu_type=offer.gpu.name,
            count=count,
            region=offer.region,
            price_per_hour=offer.price(count),
            status=made.status,
            created_at=made.created_at,
            labels=dict(labels),
            trust_first_host_key=self._policy == "tofu",
        )

    async def get(self, instance_id: str) -> Instance:
        answer = await self._http.call("GET", f"/vms/{quote(instance_id, safe='')}/status")
        return self._instance(self._parse(_Vm, answer, "the VM"))

    async def wait_ready(self, instance: Instance, timeout: float) -> Instance:
        return await poll_ready(self.get, instance, timeout)

    async def delete(self, instance_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._http.call("DELETE", f"/vms/{quote(instance_id, safe='')}")

    async def list_instances(self, labels: dict[str, str]) -> list[Instance]:
        found = self._parse(_Vms, await self._http.call("GET", "/vms/list"), "the VMs")
        # The list keeps terminated VMs, under the same display name.
        listed = [self._instance(vm) for vm in found.vms]
        return [
            i for i in listed if i.status != "terminated" and labelling.selects(labels, i.labels)
        ]

    def _parse(self, model: type[Any], payload: Any, what: str) -> Any:
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise self._http.bad_answer(
                f"answered {what} with a bad value at {where}: {first['msg']}"
            ) from None

    def _instance(self, vm: _Vm) -> Instance:
        address = _address(vm.ip_address)
        created = vm.created_at
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)  # some answers carry no zone
        count = vm.instance_specs.gpu_count or 1
        profile = (vm.instance_specs.gpu_type or "?").upper()
        spot = vm.instance_type == "spot"
        return Instance(
            id=vm.vm_id,
            gpu_type=profile,
            count=count,
            region=REGION,
            price_per_hour=self._prices.get((profile, spot), 0.0) * count,
            status=_STATES.get(vm.status, "provisioning"),
            created_at=created.timestamp() if created else time.time(),
            labels=labelling.from_name(vm.display_name),
            ip=address[0] if address else None,
            ssh_port=address[1] if address else None,
            ssh_user=SSH_USER,
            trust_first_host_key=self._policy == "tofu",
        )


def _address(text: str | None) -> tuple[str, int] | None:
    """``host`` or ``host:port`` (22 if none); None while there is none or it is no IP."""
    if not text:
        return None
    host, port = text, 22
    if text.count(":") == 1:
        host, _, digits = text.partition(":")
        if not digits.isdigit() or not 1 <= int(digits) <= 65535:
            return None
        port = int(digits)
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return host.strip("[]"), port


def _error(status: int, body: bytes, headers: httpx.Headers, what: str) -> ProviderError:
    """``{"detail": ...}``: a string, or FastAPI's list of validation errors (422)."""
    detail = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        detail = one_line(json.loads(body).get("detail", ""))
    said = f": {detail}" if detail else ""
    if status == 429:
        return rate_limited(what, headers)
    if status in (401, 403):
        return AuthError(f"Lyceum refused the API key ({what}, HTTP {status}); check {KEY_ENV}")
    if status == 402:
        return QuotaExceeded(f"Lyceum refused {what}: insufficient credits{said}")
    if _NO_CAPACITY in detail:
        return OutOfCapacity(f"Lyceum is out of capacity{said}")
    if status == 404:
        return NotFound(f"{what}: not found{said}")
    if status >= 500:
        return Transient(f"the Lyceum API failed {what} (HTTP {status}){said}")
    return InvalidRequest(f"the Lyceum API rejected {what} (HTTP {status}){said}")
