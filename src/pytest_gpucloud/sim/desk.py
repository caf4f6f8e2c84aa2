"""What every dialect's handlers share: faults applied to an answer, bodies parsed.

A handler names its operation (``create``, ``get``, ...) so the fault rules of
:mod:`~pytest_gpucloud.sim.faults` apply to every dialect alike; refusals are raised as
:class:`~pytest_gpucloud.sim.cloud.ApiError` and each dialect renders them in its vendor's
error shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python
from starlette.responses import JSONResponse, Response

from pytest_gpucloud.sim.cloud import ApiError, Cloud
from pytest_gpucloud.sim.faults import (
    HttpError,
    HttpErrorAfter,
    IgnoreDelete,
    Malformed,
    Op,
    Override,
    Slow,
)

_M = TypeVar("_M", bound=BaseModel)


class Desk:
    """The cloud as the dialects' handlers see it."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud

    async def answer(
        self, op: Op, gpu_type: str | None, action: Callable[[], object], status: int = 200
    ) -> Response:
        """Carry out ``action`` and answer its result, as the first matching fault allows."""
        fault = self.cloud.faults.take_api(op, gpu_type)
        if isinstance(fault, Slow):
            await asyncio.sleep(fault.delay_s)
        if isinstance(fault, HttpError):
            raise ApiError(fault.status, fault.code, fault.message, fault.retry_after)
        if isinstance(fault, Malformed):
            return Response(fault.body, fault.status, media_type=fault.content_type)
        if isinstance(fault, IgnoreDelete):
            return Response(status_code=202)
        payload = to_jsonable_python(action())
        if isinstance(fault, HttpErrorAfter):
            raise ApiError(fault.status, fault.code, fault.message)
        if isinstance(fault, Override):
            payload = _override(payload, fault.fields)
        return Response(status_code=status) if payload is None else JSONResponse(payload, status)

    def gpu_type_of(self, instance_id: str) -> str | None:
        instance = self.cloud.instances.get(instance_id)
        return None if instance is None else instance.request.gpu_type


def parse(model: type[_M], body: bytes) -> _M:
    """``body`` as ``model``; a bad one is a 400 (not JSON) or 422 naming each field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
        summary = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)
        raise ApiError(status, "invalid_request", summary) from exc


def _override(payload: Any, fields: dict[str, Any]) -> Any:
    if isinstance(payload, list):
        return [_override(item, fields) for item in payload]
    return {**payload, **fields} if isinstance(payload, dict) else payload
