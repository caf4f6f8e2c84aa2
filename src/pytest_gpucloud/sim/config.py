"""The simulated cloud's settings and its seed catalog."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pytest_gpucloud.core.wire import GpuTypeModel

_US, _EU_WEST, _EU_CENTRAL = "us-east-1", "eu-west-1", "eu-central-1"

# (name, vram GB, on-demand $/h per GPU, regions): DESIGN.md section 4, illustrative.
_SEED: list[tuple[str, int, float, list[str]]] = [
    ("T4", 16, 0.53, [_US, _EU_WEST, _EU_CENTRAL]),
    ("L4", 24, 0.70, [_US, _EU_WEST]),
    ("A10G", 24, 1.01, [_US, _EU_WEST]),
    ("L40S", 48, 1.95, [_US, _EU_CENTRAL]),
    ("A100-40GB", 40, 1.99, [_US, _EU_WEST]),
    ("A100-80GB", 80, 2.49, [_US, _EU_WEST, _EU_CENTRAL]),
    ("H100", 80, 3.29, [_US, _EU_WEST, _EU_CENTRAL]),
    ("H200", 141, 3.99, [_US, _EU_CENTRAL]),
    ("B200", 180, 6.99, [_US]),
]


def default_catalog() -> list[GpuTypeModel]:
    """The sim's seed catalog: nine types, all available."""
    return [
        GpuTypeModel(name=name, vram_gb=vram, price_per_hour=price, regions=regions)
        for name, vram, price, regions in _SEED
    ]


class SimSettings(BaseModel):
    """What ``PUT /_sim/config`` may change while the sim runs (give only what changes)."""

    model_config = ConfigDict(extra="forbid")

    boot_delay_s: float = Field(default=0.2, ge=0)
    terminate_delay_s: float = Field(default=0.05, ge=0)
    # The sim's clock for max_lifetime_s: 0.001 makes the 60 s minimum last 60 ms.
    lifetime_scale: float = Field(default=1.0, gt=0)
    lifetime_check_interval_s: float = Field(default=1.0, gt=0)
    catalog: list[GpuTypeModel] = Field(default_factory=default_catalog)
    # A directory put first on the PATH of instance processes.
    extra_path: str | None = None


Dialect = Literal["rest", "lambda", "runpod", "lyceum"]
DIALECTS: tuple[Dialect, ...] = ("rest", "lambda", "runpod", "lyceum")


class SimConfig(SimSettings):
    """Everything the sim is started with; ``port=0`` picks a free port; ``dialect``: the API
    it speaks, the project's REST API or a vendor's (:mod:`pytest_gpucloud.sim.dialects`)."""

    dialect: Dialect = "rest"
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    api_key: str | None = None
