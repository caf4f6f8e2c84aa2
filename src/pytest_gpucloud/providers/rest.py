"""The ``rest`` provider: an async client of the GPU cloud REST API (DESIGN.md section 4)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import (
    AuthError,
    BadAnswer,
    InstanceError,
    InvalidRequest,
    NotFound,
    OutOfCapacity,
    ProviderError,
    RateLimited,
    Transient,
)
from pytest_gpucloud.core.escape import visible
from pytest_gpucloud.core.wire import (
    CreateInstanceRequest,
    ErrorBody,
    GpuTypeModel,
    InstanceModel,
)
from pytest_gpucloud.providers.base import Instance

MAX_BODY = 4 * 1024 * 1024
M = TypeVar("M")
R = TypeVar("R")

_GPU_TYPES: TypeAdapter[list[GpuTypeModel]] = TypeAdapter(list[GpuTypeModel])
_INSTANCES: TypeAdapter[list[InstanceModel]] = TypeAdapter(list[InstanceModel])
_INSTANCE: TypeAdapter[InstanceModel] = TypeAdapter(InstanceModel)


class RestProvider:
    """Talks to ``base_url`` with a bearer token. The token appears in no message."""

    name = "rest"
    simulated = False

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        request_timeout: float = 30.0,
        attempts: int = 5,
        poll_interval: float = 0.05,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "pytest-gpucloud"},
            timeout=request_timeout,
            trust_env=False,
            transport=transport,
        )
        url = self._client.base_url
        # host[:port] only: a URL's user info never reaches a message
        self._where = url.host + (f":{url.port}" if url.port else "")
        self._attempts = attempts
        self._poll_interval = poll_interval

    async def aclose(self) -> None:
        await self._client.aclose()

    async def catalog(self) -> list[GpuType]:
        models = await self._call("GET", "/v1/gpu-types", _GPU_TYPES)
        return [
            GpuType(m.name, m.vram_gb, m.price_per_hour, m.available, tuple(m.regions))
            for m in models
        ]

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
        body = CreateInstanceRequest(
            gpu_type=offer.gpu.name,
            count=count,
            image=image,
            region=offer.region,
            ssh_public_key=ssh_public_key,
            labels=labels,
            max_lifetime_s=max_lifetime_s,
            client_token=client_token,
        )
        # The client token makes a retried create return the instance the first try made.
        model = await self._call("POST", "/v1/instances", _INSTANCE, json_body=body)
        return _instance(model)

    async def get(self, instance_id: str) -> Instance:
        return _instance(await self._call("GET", f"/v1/instances/{instance_id}", _INSTANCE))

    async def wait_ready(self, instance: Instance, timeout: float) -> Instance:
        return await poll_ready(self.get, instance, timeout, interval=self._poll_interval)

    async def delete(self, instance_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self._call("DELETE", f"/v1/instances/{instance_id}", None)

    async def list_instances(self, labels: dict[str, str]) -> list[Instance]:
        params = httpx.QueryParams([("label", f"{k}={v}") for k, v in sorted(labels.items())])
        models = await self._call("GET", "/v1/instances", _INSTANCES, params=params)
        return [_instance(m) for m in models]

    async def _call(
        self,
        method: str,
        path: str,
        adapter: TypeAdapter[M] | None,
        *,
        json_body: BaseModel | None = None,
        params: httpx.QueryParams | None = None,
    ) -> M:
        async def once() -> M:
            payload = await self._send(method, path, json_body, params)
            return _parse(adapter, payload, method, path)

        return await retrying(once, self._attempts)

    async def _send(
        self,
        method: str,
        path: str,
        json_body: BaseModel | None,
        params: httpx.QueryParams | None,
    ) -> Any:
        what = f"{method} {path}"
        content = None if json_body is None else json_body.model_dump_json().encode()
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            async with self._client.stream(
                method, path, content=content, params=params, headers=headers
            ) as response:
                body = await read_capped(response, what)
        except httpx.TimeoutException:
            raise Transient(f"the GPU cloud API did not answer {what} in time") from None
        except httpx.TransportError as exc:
            raise Transient(
                f"could not reach the GPU cloud API at {self._where} "
                f"for {what}: {type(exc).__name__}"
            ) from None
        if response.status_code >= 400:
            raise _api_error(response, body, what)
        if response.status_code == 204 or not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise _bad_answer(
                f"the GPU cloud API answered {what} with a body that is not JSON"
            ) from None


async def poll_ready(
    get: Callable[[str], Awaitable[Instance]],
    instance: Instance,
    timeout: float,
    *,
    interval: float = 0.05,
    max_interval: float = 2.0,
) -> Instance:
    """Poll ``get`` until the instance runs with an SSH address (a status alone is not
    enough: some clouds say running before the address exists)."""
    deadline = time.monotonic() + timeout
    while True:
        current = await get(instance.id)
        if current.status == "running" and current.ip and current.ssh_port:
            return current
        if current.status in ("failed", "terminating", "terminated"):
            raise InstanceError(
                f"instance {instance.id} ({instance.gpu_type}) is {current.status} "
                "instead of booting"
            )
        if time.monotonic() + interval > deadline:
            raise InstanceError(
                f"instance {instance.id} ({instance.gpu_type}) did not boot within "
                f"{timeout:g} s (still {current.status}"
                f"{', no SSH address yet' if current.status == 'running' else ''}); raise "
                "--gpu-boot-timeout if this type boots slowly"
            )
        await asyncio.sleep(interval)
        interval = min(interval * 1.5, max_interval)


async def retrying(call: Callable[[], Awaitable[R]], attempts: int) -> R:
    """Retry transient errors and rate limits with jittered, bounded backoff."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((Transient, RateLimited)),
        stop=stop_after_attempt(attempts),
        wait=_wait,
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover


# 0.2 s doubling up to 5 s, plus up to 0.2 s of jitter (in every tenacity pyproject.toml allows)
_backoff = wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.2)


def _wait(retry_state: Any) -> float:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    if isinstance(error, RateLimited):
        return min(error.retry_after, 60.0)
    return float(_backoff(retry_state))


async def read_capped(response: httpx.Response, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY:
            raise _bad_answer(
                f"the GPU cloud API answered {what} with more than {MAX_BODY // 1024 // 1024} MiB"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _api_error(response: httpx.Response, body: bytes, what: str) -> ProviderError:
    status = response.status_code
    code, message = "", ""
    try:
        detail = ErrorBody.model_validate_json(body).error
        code, message = detail.code, detail.message
    except ValidationError:
        pass
    # The API's words, on one line and with control characters shown: they end up in a
    # one-line error on the user's terminal.
    message = visible(" ".join(message.split())[:300], one_line=True)
    said = f": {message}" if message else ""
    if status == 401 or code == "unauthorized":
        return AuthError(
            f"the GPU cloud API refused the API key ({what}, HTTP {status}); check GPUCLOUD_API_KEY"
        )
    if status == 404 or code == "not_found":
        return NotFound(f"{what}: not found{said}")
    if status == 429 or code == "rate_limited":
        return RateLimited(f"{what}: rate limited{said}", _retry_after(response))
    if code == "out_of_capacity":
        return OutOfCapacity(f"out of capacity{said}")
    if status >= 500:
        return Transient(f"the GPU cloud API failed {what} (HTTP {status}){said}")
    return InvalidRequest(f"the GPU cloud API rejected {what} (HTTP {status}){said}")


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _parse(adapter: TypeAdapter[M] | None, payload: Any, method: str, path: str) -> M:
    if adapter is None:
        return None  # type: ignore[return-value]
    try:
        return adapter.validate_python(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise _bad_answer(
            f"the GPU cloud API answered {method} {path} with a bad value at {where}: "
            f"{first['msg']}"
        ) from None


def _bad_answer(what: str) -> BadAnswer:
    return BadAnswer(
        f"{what}; check that --gpu-api-url (GPUCLOUD_API_URL) is your GPU cloud's API, "
        "and if it is, report the answer to its provider"
    )


def _instance(model: InstanceModel) -> Instance:
    return Instance(
        id=model.id,
        gpu_type=model.gpu_type,
        count=model.count,
        region=model.region,
        price_per_hour=model.price_per_hour,
        status=model.status,
        created_at=model.created_at.timestamp(),
        labels=dict(model.labels),
        ip=model.ip,
        ssh_port=model.ssh_port,
        ssh_user=model.ssh_user,
        ssh_host_key=model.ssh_host_key,
    )
