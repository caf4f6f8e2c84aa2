"""The ``rest`` API as an OpenAPI 3.1 document, generated from its wire models.

A platform team can implement it in front of its own machines. The simulated cloud serves it
at ``/openapi.json``; ``docs/openapi.json`` is a checked-in copy (``python -m
pytest_gpucloud.core.openapi > docs/openapi.json`` writes it; a test keeps the two equal).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import models_json_schema

from pytest_gpucloud.core.wire import CreateInstanceRequest, ErrorBody, GpuTypeModel, InstanceModel

VERSION = "1.0.0"
_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "invalid_request: a malformed request",
        401: "unauthorized: a missing or wrong bearer token",
        404: "not_found: no such instance (for a delete: already gone)",
        409: "out_of_capacity: try another GPU type or region",
        422: "invalid_request: a field fails validation",
        429: "rate_limited: retry after the Retry-After header's seconds",
        503: "out_of_capacity: try another GPU type or region",
    }
    return {str(s): _json(_ref("ErrorBody"), meaning[s]) for s in statuses}


def document() -> dict[str, Any]:
    """The OpenAPI document of the REST API (DESIGN.md section 4)."""
    _, defs = models_json_schema(
        [
            (GpuTypeModel, "serialization"),
            (CreateInstanceRequest, "validation"),
            (InstanceModel, "serialization"),
            (ErrorBody, "serialization"),
        ],
        ref_template=_REF,
    )
    instance_id = {
        "name": "instance_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pytest-gpucloud GPU cloud API",
            "version": VERSION,
            "description": (
                "What the rest provider of pytest-gpucloud speaks. Base URL from "
                "GPUCLOUD_API_URL, bearer token from GPUCLOUD_API_KEY. client_token makes a "
                "retried create return the same instance; max_lifetime_s is a server-side "
                "dead-man switch; ssh_host_key is pinned by the client."
            ),
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/gpu-types": {
                "get": {
                    "operationId": "listGpuTypes",
                    "responses": {
                        "200": _json(
                            {"type": "array", "items": _ref("GpuTypeModel")}, "the catalog"
                        ),
                        **_errors(401, 429),
                    },
                }
            },
            "/v1/instances": {
                "post": {
                    "operationId": "createInstance",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("CreateInstanceRequest")}},
                    },
                    "responses": {
                        "201": _json(
                            _ref("InstanceModel"),
                            "created (or the one made earlier with this client_token)",
                        ),
                        **_errors(400, 401, 409, 422, 429, 503),
                    },
                },
                "get": {
                    "operationId": "listInstances",
                    "parameters": [
                        {
                            "name": "label",
                            "in": "query",
                            "description": "key=value; repeated: every label must match",
                            "schema": {"type": "array", "items": {"type": "string"}},
                            "style": "form",
                            "explode": True,
                        }
                    ],
                    "responses": {
                        "200": _json(
                            {"type": "array", "items": _ref("InstanceModel")}, "the live instances"
                        ),
                        **_errors(400, 401, 429),
                    },
                },
            },
            "/v1/instances/{instance_id}": {
                "parameters": [instance_id],
                "get": {
                    "operationId": "getInstance",
                    "responses": {
                        "200": _json(
                            _ref("InstanceModel"),
                            "the instance; ip, ssh_port, ssh_user and ssh_host_key once running",
                        ),
                        **_errors(401, 404, 429),
                    },
                },
                "delete": {
                    "operationId": "deleteInstance",
                    "responses": {
                        "202": {"description": "terminating"},
                        "204": {"description": "terminated"},
                        **_errors(401, 404, 429),
                    },
                },
            },
        },
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def text() -> str:
    """The document as checked in: indented JSON with a final newline."""
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(text(), end="")
