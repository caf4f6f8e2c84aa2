"""Deleting an instance for sure: sent again until accepted, then verified by polling.

Used by the session's teardown and by ``python -m pytest_gpucloud cleanup``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pytest_gpucloud.core.errors import AuthError, InvalidRequest, NotFound, ProviderError

if TYPE_CHECKING:
    from pytest_gpucloud.providers.base import Provider

DELETE_WITHIN_S = 30.0
# An instance still running this long after its delete was accepted is sent another.
RESEND_AFTER_S = 2.0
_FIRST_POLL_S = 0.05
_MAX_POLL_S = 1.0


async def delete_verified(
    provider: Provider, instance_id: str, within: float = DELETE_WITHIN_S
) -> None:
    """Delete ``instance_id`` and poll until the provider reports it terminated or unknown.

    A failed delete (after the provider's own retries of 5xx, timeouts and rate limits) is
    sent again with backoff; not found counts as deleted; an instance that keeps running
    after its delete was accepted gets another. Raises :class:`ProviderError` naming the
    instance when it may still be alive after ``within`` seconds, or at once when the API
    refuses the key or the request (that will not change by asking again).
    """
    deadline = time.monotonic() + within
    accepted_at: float | None = None
    status, reason = "unknown", ""
    interval = _FIRST_POLL_S
    while True:
        try:
            if accepted_at is None:
                await provider.delete(instance_id)
                accepted_at = time.monotonic()
                interval = _FIRST_POLL_S
            status = (await provider.get(instance_id)).status
        except NotFound:
            return
        except (AuthError, InvalidRequest) as exc:
            raise ProviderError(f"could not delete instance {instance_id}: {exc}") from None
        except ProviderError as exc:
            reason = f": {exc}"
        else:
            if status == "terminated":
                return
            reason = f" (still {status})"
            if status != "terminating" and time.monotonic() - accepted_at >= RESEND_AFTER_S:
                accepted_at = None
        if time.monotonic() + interval > deadline:
            if status == "terminating":
                return  # accepted: the cloud is ending it
            raise ProviderError(
                f"instance {instance_id} may still be running {within:g} s after its delete{reason}"
            )
        await asyncio.sleep(interval)
        interval = min(interval * 1.5, _MAX_POLL_S)


async def sweep(
    provider: Provider, labels: dict[str, str], held: set[str]
) -> tuple[list[str], list[str]]:
    """Delete the instances with ``labels`` that none of ``held`` accounts for (a create
    whose answer was lost or unreadable): the ids that may still be alive, and notes on
    what went wrong."""
    try:
        found = await provider.list_instances(labels)
    except ProviderError as exc:
        return [], [f"could not look for stray instances of this session: {exc}"]
    strays = [i.id for i in found if i.id not in held and i.status != "terminated"]
    results = await asyncio.gather(
        *(delete_verified(provider, i) for i in strays), return_exceptions=True
    )
    wrong = [
        (i, result)
        for i, result in zip(strays, results, strict=True)
        if isinstance(result, BaseException)
    ]
    return [i for i, _ in wrong], [f"{i}: delete failed: {result}" for i, result in wrong]
