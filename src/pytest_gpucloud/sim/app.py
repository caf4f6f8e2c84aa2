"""The simulated cloud's HTTP side: the REST API of DESIGN.md section 4 (its OpenAPI document
at ``/openapi.json``), or a vendor's dialect, and an admin API.

Every path needs ``Authorization: Bearer <token>``: with an ``api_key`` configured only
that token, else any non-empty one. Errors are ``{"error": {"code", "message"}}``.

Admin API, for tests and the CLI (models in ``pytest_gpucloud.core.wire``):

- ``GET /_sim/instances`` -> ``[SimInstanceRecord]``: every instance ever created, with
  its time stamps and every command run on it over SSH.
- ``GET /_sim/requests`` -> ``[SimRequestRecord]``: the API's requests in the order they
  were answered, each stamped with the time it arrived.
- ``GET /_sim/faults`` -> ``{"faults": [rule]}``: the active fault rules (``faults.py``).
- ``POST /_sim/faults`` ``{"faults": [rule, ...]}``: adds rules; answers as GET.
- ``DELETE /_sim/faults``: removes every rule; answers as GET.
- ``PUT /_sim/config`` ``{"boot_delay_s": 0.5, ...}``: changes the given ``SimSettings``
  fields; answers the settings now in force (``api_key`` left out).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pytest_gpucloud.core import openapi
from pytest_gpucloud.core.wire import (
    CreateInstanceRequest,
    ErrorBody,
    ErrorCode,
    ErrorDetail,
    SimRequestRecord,
)
from pytest_gpucloud.sim.cloud import ApiError, Cloud
from pytest_gpucloud.sim.config import SimConfig, SimSettings
from pytest_gpucloud.sim.desk import Desk, parse
from pytest_gpucloud.sim.dialects import Dialect, make_dialect
from pytest_gpucloud.sim.faults import FaultList
from pytest_gpucloud.sim.instances import utcnow

_M = TypeVar("_M", bound=BaseModel)


def create_app(config: SimConfig) -> Starlette:
    """The sim as an ASGI app; its lifespan enforces lifetimes and ends every instance.

    It speaks ``config.dialect``: the REST API above, or a vendor's (:mod:`.dialects`).
    """
    cloud = Cloud(config)
    desk = Desk(cloud)
    api = _Api(desk)
    dialect: Dialect = api if config.dialect == "rest" else make_dialect(config.dialect, desk)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(cloud.enforce_lifetimes())
        try:
            yield
        finally:
            reaper.cancel()
            await cloud.shutdown()

    def error(request: Request, exc: Exception) -> Response:
        return dialect.render(_api_error(exc))

    return Starlette(
        routes=api.admin_routes() + dialect.routes(),
        middleware=[
            Middleware(_LogRequests, cloud=cloud),
            Middleware(_Auth, api_key=config.api_key, render=dialect.render),
        ],
        exception_handlers={ApiError: error, HTTPException: error, Exception: error},
        lifespan=lifespan,
    )


class _Api:
    """The REST API of DESIGN.md section 4 (the ``rest`` dialect) and the admin API."""

    def __init__(self, desk: Desk) -> None:
        self.desk = desk
        self.cloud = desk.cloud

    def routes(self) -> list[Route]:
        return [
            Route("/v1/gpu-types", self.gpu_types, methods=["GET"]),
            Route("/v1/instances", self.create_instance, methods=["POST"]),
            Route("/v1/instances", self.list_instances, methods=["GET"]),
            Route("/v1/instances/{instance_id}", self.get_instance, methods=["GET"]),
            Route("/v1/instances/{instance_id}", self.delete_instance, methods=["DELETE"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]

    def admin_routes(self) -> list[Route]:
        return [
            Route("/_sim/instances", self.sim_instances, methods=["GET"]),
            Route("/_sim/requests", self.sim_requests, methods=["GET"]),
            Route("/_sim/faults", self.sim_faults, methods=["GET", "POST", "DELETE"]),
            Route("/_sim/config", self.sim_config, methods=["PUT"]),
        ]

    def render(self, error: ApiError) -> Response:
        return _error_response(error)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi.document())

    async def gpu_types(self, request: Request) -> Response:
        return await self.desk.answer("gpu_types", None, lambda: self.cloud.config.catalog)

    async def create_instance(self, request: Request) -> Response:
        body = parse(CreateInstanceRequest, await request.body())
        return await self.desk.answer(
            "create", body.gpu_type, lambda: self.cloud.create(body).model(), status=201
        )

    async def list_instances(self, request: Request) -> Response:
        labels = _label_filter(request)
        return await self.desk.answer(
            "list", None, lambda: [i.model() for i in self.cloud.live(labels)]
        )

    async def get_instance(self, request: Request) -> Response:
        instance_id = request.path_params["instance_id"]
        return await self.desk.answer(
            "get", self.desk.gpu_type_of(instance_id), lambda: self.cloud.get(instance_id).model()
        )

    async def delete_instance(self, request: Request) -> Response:
        instance_id = request.path_params["instance_id"]
        return await self.desk.answer(
            "delete",
            self.desk.gpu_type_of(instance_id),
            lambda: self.cloud.delete(instance_id),
            status=202,
        )

    async def sim_instances(self, request: Request) -> Response:
        return _json([instance.record() for instance in self.cloud.instances.values()])

    async def sim_requests(self, request: Request) -> Response:
        return _json(list(self.cloud.requests))

    async def sim_faults(self, request: Request) -> Response:
        if request.method == "POST":
            self.cloud.faults.rules.extend(parse(FaultList, await request.body()).faults)
        elif request.method == "DELETE":
            self.cloud.faults.rules.clear()
        return _json(FaultList(faults=self.cloud.faults.rules))

    async def sim_config(self, request: Request) -> Response:
        self.cloud.configure(parse(SimSettings, await request.body()))
        return JSONResponse(self.cloud.config.model_dump(mode="json", exclude={"api_key"}))


class _Auth:
    """Bearer auth on every path: with an ``api_key`` only that token, else any non-empty."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, render: Callable[[ApiError], Response]
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allows(Headers(scope=scope)):
            refusal = ApiError(401, "unauthorized", "missing or wrong bearer token")
            await self.render(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allows(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return self.api_key is None or hmac.compare_digest(token.encode(), self.api_key.encode())


class _LogRequests:
    """Log every request of the cloud's API (not ``/_sim``), with its status, in
    ``Cloud.requests``."""

    def __init__(self, app: ASGIApp, cloud: Cloud) -> None:
        self.app = app
        self.cloud = cloud

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sim/"):
            await self.app(scope, receive, send)
            return
        arrived = utcnow()
        status = 500  # unless an answer starts

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.cloud.requests.append(
                SimRequestRecord(
                    method=scope["method"],
                    path=scope["path"],
                    query=scope["query_string"].decode("latin-1"),
                    status=status,
                    time=arrived,
                )
            )


def _label_filter(request: Request) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in request.query_params.getlist("label"):
        key, equals, value = item.partition("=")
        if not key or not equals:
            raise ApiError(400, "invalid_request", f"label filter {item!r} is not key=value")
        labels[key] = value
    return labels


def _json(value: object) -> JSONResponse:
    return JSONResponse(to_jsonable_python(value))


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, HTTPException):
        code: ErrorCode = "not_found" if exc.status_code == 404 else "invalid_request"
        return ApiError(exc.status_code, code, str(exc.detail))
    if isinstance(exc, ApiError):
        return exc
    return ApiError(500, "internal", "internal error in the simulated cloud")


def _error_response(error: ApiError) -> Response:
    body = ErrorBody(error=ErrorDetail(code=error.code, message=error.message[:4096]))
    headers = {} if error.retry_after is None else {"Retry-After": str(error.retry_after)}
    if error.code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(mode="json"), error.status, headers=headers)
