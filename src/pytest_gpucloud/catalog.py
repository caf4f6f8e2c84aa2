"""GPU types and offers: what a provider can create, and at what price."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuType:
    """One kind of GPU in a provider's catalog (price is per GPU per hour)."""

    name: str
    vram_gb: int
    price_per_hour: float
    available: bool
    regions: tuple[str, ...]

    @property
    def family(self) -> str:
        """``"A100"`` for ``"A100-80GB"``: the name before the first dash, upper-cased."""
        return self.name.split("-", 1)[0].upper()


@dataclass(frozen=True)
class Offer:
    """A GPU type in one region: the unit a provider can create."""

    gpu: GpuType
    region: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.gpu.name, self.region)

    def price(self, count: int) -> float:
        return self.gpu.price_per_hour * count
