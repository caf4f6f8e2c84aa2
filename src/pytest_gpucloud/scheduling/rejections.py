"""Why the plan did not take an offer: for the plan's pull-request comment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pytest_gpucloud.core.catalog import GpuType, Offer, feasible_offers
from pytest_gpucloud.core.request import GpuRequest


@dataclass(frozen=True)
class Rejection:
    """An offer of a type the request names (any type, where it names none), not taken."""

    offer: Offer
    price_per_hour: float
    why: str


def rejected_offers(
    request: GpuRequest, catalog: Sequence[GpuType], regions: Sequence[str], chosen: Offer | None
) -> list[Rejection]:
    """Every offer a pool could have considered other than ``chosen``, cheapest first."""
    feasible = [o.key for o in feasible_offers(request, catalog, regions)]
    names = {name.upper() for name in request.types}
    rejections = []
    for gpu in catalog:
        if names and gpu.names.isdisjoint(names):
            continue
        for region in gpu.regions:
            offer = Offer(gpu, region)
            if chosen is None or offer.key != chosen.key:
                why = _why(offer, request, feasible, chosen)
                rejections.append(Rejection(offer, offer.price(request.count), why))
    return sorted(rejections, key=lambda r: (r.price_per_hour, r.offer.key))


def _why(
    offer: Offer, request: GpuRequest, feasible: list[tuple[str, str]], chosen: Offer | None
) -> str:
    gpu = offer.gpu
    if not gpu.available:
        return "unavailable"
    if request.min_vram_gb is not None and gpu.vram_gb < request.min_vram_gb:
        return f"{gpu.vram_gb} GB, at least {request.min_vram_gb} GB needed"
    if offer.key not in feasible:
        return "region not allowed by --gpu-region"
    if chosen is None:
        return "not chosen"
    taken = f"{chosen.gpu.name} in {chosen.region}"
    ordered = request.mode == "ordered" and chosen.key in feasible
    if ordered and feasible.index(offer.key) > feasible.index(chosen.key):
        return f"later in the requested order than {taken}"
    if offer.price(request.count) > chosen.price(request.count):
        return f"dearer than {taken}"
    return f"as cheap as {taken}, which comes first by name and region"
