"""Failover state of one session: the offers found out of capacity, and the create calls left.

An offer (GPU type in a region) that answered ``out_of_capacity`` is avoided for the rest of
the session, by every request. Every create call counts against ``--gpu-max-creates``; one
call is one instance at most (its retries of 5xx, timeouts and 429 reuse one client token).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_gpucloud.core.errors import OutOfCapacity, ProviderError

if TYPE_CHECKING:
    from pytest_gpucloud.core.catalog import Offer


@dataclass
class Failover:
    max_creates: int
    avoided: dict[tuple[str, str], None] = field(default_factory=dict)
    creates: int = 0

    def usable(self, offers: Iterable[Offer]) -> list[Offer]:
        """``offers`` without the avoided ones, in their order."""
        return [offer for offer in offers if offer.key not in self.avoided]

    def avoid(self, offer: Offer) -> None:
        self.avoided[offer.key] = None

    def spend_create(self, spec: str, tried: list[str]) -> None:
        """Count one create call, or raise if ``--gpu-max-creates`` is used up."""
        if self.creates >= self.max_creates:
            raise ProviderError(
                f"no instance for {spec}: --gpu-max-creates {self.max_creates} create calls "
                f"were used up{_tried(tried)}"
            )
        self.creates += 1

    def exhausted(self, spec: str, offers: Iterable[Offer], tried: list[str]) -> OutOfCapacity:
        """The error when no offer for ``spec`` has capacity; names every offer tried."""
        earlier = [_name(o.key) for o in offers if o.key in self.avoided]
        earlier = [name for name in earlier if name not in tried]
        parts = []
        if tried:
            parts.append(f"out of capacity: {', '.join(tried)}")
        if earlier:
            parts.append(f"out of capacity earlier in this session: {', '.join(earlier)}")
        return OutOfCapacity(f"no instance for {spec}: {'; '.join(parts) or 'no offer'}")


def offer_name(offer: Offer) -> str:
    return _name(offer.key)


def _name(key: tuple[str, str]) -> str:
    return f"{key[0]} in {key[1]}"


def _tried(tried: list[str]) -> str:
    return f" (out of capacity: {', '.join(tried)})" if tried else ""
