"""The ``rest`` API's OpenAPI document: generated from the wire models, served by the
simulated cloud, checked in under docs/."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from openapi_spec_validator import validate

from pytest_gpucloud.core import openapi as api_contract
from tests.cloud import Sim

CHECKED_IN = Path(__file__).parent.parent / "docs" / "openapi.json"


def test_the_checked_in_document_is_the_generated_one() -> None:
    # Parsed: pydantic writes 10000 or 10000.0 by version, the same document to a reader.
    assert json.loads(CHECKED_IN.read_text()) == json.loads(api_contract.text()), (
        "docs/openapi.json is stale: run python -m pytest_gpucloud.core.openapi > docs/openapi.json"
    )


def test_the_sim_serves_it(sim: Sim) -> None:
    served = httpx.get(
        f"{sim.url}/openapi.json", headers={"Authorization": f"Bearer {sim.api_key}"}
    )
    assert served.json() == json.loads(CHECKED_IN.read_text())


def test_it_is_a_valid_openapi_document_naming_every_route() -> None:
    document = api_contract.document()
    validate(document)
    assert set(document["paths"]) == {
        "/v1/gpu-types",
        "/v1/instances",
        "/v1/instances/{instance_id}",
    }
    assert document["paths"]["/v1/instances"]["post"]["requestBody"]["content"]["application/json"]
