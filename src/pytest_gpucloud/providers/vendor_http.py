"""The HTTP side every vendor provider shares: bearer auth, capped bodies, retries.

Each vendor supplies how its error answers read (``errors``); the key appears in no message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from pytest_gpucloud.core.errors import (
    BadAnswer,
    ProviderError,
    RateLimited,
    Transient,
)
from pytest_gpucloud.providers.rest import read_capped, retrying

#: (status, body, headers, "METHOD /path") -> the error to raise.
ErrorReader = Callable[[int, bytes, httpx.Headers, str], ProviderError]


class VendorHttp:
    """An API client for one vendor's ``base_url``."""

    def __init__(
        self,
        vendor: str,
        base_url: str,
        api_key: str,
        errors: ErrorReader,
        *,
        attempts: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.vendor = vendor
        self._errors = errors
        self._attempts = attempts
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "pytest-gpucloud"},
            timeout=30.0,
            trust_env=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        retry: bool = True,
    ) -> Any:
        """The decoded JSON answer (None for an empty one). ``retry``: retry transient errors
        and rate limits (never for a call that may not be repeated)."""

        async def once() -> Any:
            return await self._send(method, path, body)

        return await retrying(once, self._attempts if retry else 1)

    async def _send(self, method: str, path: str, body: Any) -> Any:
        what = f"{method} {path}"
        try:
            async with self._client.stream(method, path, json=body) as response:
                content = await read_capped(response, what)
        except httpx.TimeoutException:
            raise Transient(f"the {self.vendor} API did not answer {what} in time") from None
        except httpx.TransportError as exc:
            raise Transient(
                f"could not reach the {self.vendor} API for {what}: {type(exc).__name__}"
            ) from None
        if response.status_code >= 400:
            raise self._errors(response.status_code, content, response.headers, what)
        if not content:
            return None
        try:
            return json.loads(content)
        except ValueError:
            raise self.bad_answer(f"answered {what} with a body that is not JSON") from None

    def bad_answer(self, what: str) -> BadAnswer:
        return BadAnswer(
            f"the {self.vendor} API {what}; check that --gpu-api-url, if set, is the "
            f"{self.vendor} API"
        )


def one_line(text: object, limit: int = 300) -> str:
    """An API's words, on one line and bounded: they end up in a one-line error."""
    return " ".join(str(text).split())[:limit]


def retry_after(headers: httpx.Headers, default: float) -> float:
    try:
        return max(0.0, float(headers.get("Retry-After", default)))
    except ValueError:
        return default


def rate_limited(what: str, headers: httpx.Headers, default: float = 1.0) -> RateLimited:
    return RateLimited(f"{what}: rate limited", retry_after(headers, default))
