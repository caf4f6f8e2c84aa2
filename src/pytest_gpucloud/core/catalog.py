"""GPU types and offers: what a provider can create, and at what price.

:func:`feasible_offers` turns a :class:`~pytest_gpucloud.core.request.GpuRequest` into the offers
that satisfy it, best first; :func:`check_known` and :func:`explain_infeasible` say why a
request cannot be served.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from typing import TYPE_CHECKING

from pytest_gpucloud.core.errors import MarkerError

if TYPE_CHECKING:
    from pytest_gpucloud.core.request import GpuRequest

_MAX_REASONS = 5


@dataclass(frozen=True)
class GpuType:
    """One kind of GPU in a provider's catalog (prices are per GPU per hour).

    ``spot_price_per_hour``: the price of interruptible capacity; None where there is none.
    """

    name: str
    vram_gb: int
    price_per_hour: float
    available: bool
    regions: tuple[str, ...]
    spot_price_per_hour: float | None = None

    @property
    def family(self) -> str:
        """``"A100"`` for ``"A100-80GB"``: the name before the first dash, upper-cased."""
        return self.name.split("-", 1)[0].upper()

    @cached_property
    def names(self) -> frozenset[str]:
        """The names a request can use for this type (upper-case): its own and its family."""
        return frozenset((self.name.upper(), self.family))

    def matches(self, name: str) -> bool:
        """Whether a requested type name (any case) is this type's name or its family."""
        return name.upper() in self.names


@dataclass(frozen=True)
class Offer:
    """A GPU type in one region, on-demand or spot: the unit a provider can create."""

    gpu: GpuType
    region: str
    spot: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """What failover avoids: spot capacity runs out apart from on-demand capacity."""
        return (f"{self.gpu.name} spot" if self.spot else self.gpu.name, self.region)

    def price(self, count: int) -> float:
        per_gpu = self.gpu.spot_price_per_hour if self.spot else None
        return (self.gpu.price_per_hour if per_gpu is None else per_gpu) * count


def feasible_offers(
    request: GpuRequest, catalog: Sequence[GpuType], regions: Sequence[str] = ()
) -> list[Offer]:
    """Every offer that satisfies ``request``, best first.

    An ordered request keeps its list order (cheapest first within one entry); every other
    form is sorted by total price, then type name, then region. Unavailable types are left
    out, and so is every region that matches none of the ``regions`` patterns (fnmatch,
    e.g. ``"eu-*"``; empty allows all): an allow-list, never a preference. A spot request
    gets spot offers only, of the types that have a spot price.
    """
    if request.mode != "ordered":
        names = {name.upper() for name in request.types}
        wanted = [gpu for gpu in catalog if not names or not gpu.names.isdisjoint(names)]
        return _offers(request, wanted, regions)
    chosen: dict[tuple[str, str], Offer] = {}
    for name in request.types:
        entry = _offers(request, [gpu for gpu in catalog if gpu.matches(name)], regions)
        for offer in entry:
            chosen.setdefault(offer.key, offer)
    return list(chosen.values())


def check_known(request: GpuRequest, catalog: Sequence[GpuType]) -> None:
    """Raise :class:`MarkerError` if a requested type name matches no type in the catalog.

    ``unknown GPU type "A1000": did you mean A100, A100-40GB, A100-80GB? (catalog: T4, ...)``
    """
    known = frozenset().union(*(gpu.names for gpu in catalog))
    unknown = [name for name in request.types if name.upper() not in known]
    if not unknown:
        return
    names = list(dict.fromkeys([gpu.name for gpu in catalog] + [gpu.family for gpu in catalog]))
    problems = []
    for name in unknown:
        close = _close_names(name, names)
        hint = f": did you mean {', '.join(close)}?" if close else ""
        problems.append(f'unknown GPU type "{name}"{hint}')
    listed = ", ".join(gpu.name for gpu in catalog) or "empty"
    raise MarkerError(f"{'; '.join(problems)} (catalog: {listed})")


def explain_infeasible(
    request: GpuRequest, catalog: Sequence[GpuType], regions: Sequence[str] = ()
) -> str:
    """Why :func:`feasible_offers` found nothing, in one line (call it only then).

    ``no offer for H100:2 in regions eu-*: H100 is offered in us-east-1``
    """
    where = f" in regions {', '.join(regions)}" if regions else ""
    reasons = [
        f'"{name}" is not in the catalog'
        for name in request.types
        if not any(gpu.matches(name) for gpu in catalog)
    ]
    named = catalog
    if request.types:  # in the request's order
        named = list(
            dict.fromkeys(gpu for name in request.types for gpu in catalog if gpu.matches(name))
        )
    available = [gpu for gpu in named if gpu.available]
    if request.spot and not any(gpu.spot_price_per_hour is not None for gpu in available):
        reasons.append("this provider offers no spot capacity for it")
    available = [
        gpu for gpu in available if not request.spot or gpu.spot_price_per_hour is not None
    ]
    if request.types:
        reasons += [f"{gpu.name} is unavailable" for gpu in named if not gpu.available]
    elif not available:
        reasons.append("no GPU type is available")
    large = [gpu for gpu in available if _fits(gpu, request)]
    if available and not large:
        biggest = max(available, key=lambda gpu: gpu.vram_gb)
        reasons.append(
            f"at least {request.min_vram_gb} GB needed, the largest available is "
            f"{biggest.name} with {biggest.vram_gb} GB"
        )
    elsewhere = [
        f"{gpu.name} is offered in {', '.join(gpu.regions) or 'no region'}"
        for gpu in large
        if not any(_allowed(region, regions) for region in gpu.regions)
    ]
    if len(elsewhere) > _MAX_REASONS:
        more = len(elsewhere) - _MAX_REASONS
        elsewhere[_MAX_REASONS:] = [f"{more} more types are offered only in other regions"]
    reasons += elsewhere
    return f"no offer for {request.spec}{where}: {'; '.join(reasons)}"


def _close_names(name: str, names: Sequence[str]) -> list[str]:
    """Up to three of ``names`` like ``name``, best first, ties by name (case-insensitive)."""
    wanted = name.upper()
    scored = [(difflib.SequenceMatcher(None, wanted, n.upper()).ratio(), n) for n in names]
    return [n for score, n in sorted(scored, key=lambda s: (-s[0], s[1])) if score >= 0.6][:3]


def _fits(gpu: GpuType, request: GpuRequest) -> bool:
    return request.min_vram_gb is None or gpu.vram_gb >= request.min_vram_gb


def _allowed(region: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatchcase(region.lower(), p.lower()) for p in patterns)


def _offers(request: GpuRequest, gpus: Iterable[GpuType], regions: Sequence[str]) -> list[Offer]:
    offers = {
        (gpu.name, region): Offer(gpu, region, request.spot)
        for gpu in gpus
        if gpu.available
        and _fits(gpu, request)
        and (not request.spot or gpu.spot_price_per_hour is not None)
        for region in gpu.regions
        if _allowed(region, regions)
    }
    return sorted(offers.values(), key=lambda o: (o.price(request.count), o.gpu.name, o.region))
