"""Vendor dialects of the simulated cloud: each answers as its vendor's documented API does.

A dialect is small in spirit, like httpx's ``MockTransport``: one handler per documented
endpoint, translating the vendor's paths, request and answer shapes, states and error bodies
to and from the sim's one :class:`~pytest_gpucloud.sim.cloud.Cloud`, whose machines accept
real SSH. Faults (``/_sim/faults``) apply to every dialect alike: a handler names its
operation (``gpu_types``, ``create``, ``get``, ``list``, ``delete``), and each dialect renders
the generic error codes in its vendor's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.routing import Route

    from pytest_gpucloud.sim.cloud import ApiError
    from pytest_gpucloud.sim.desk import Desk


class Dialect(Protocol):
    """The API one simulated cloud speaks."""

    def routes(self) -> list[Route]: ...

    def render(self, error: ApiError) -> Response:
        """A refusal as the vendor's error body."""
        ...


def make_dialect(name: str, desk: Desk) -> Dialect:
    """The vendor dialect called ``name`` (``lambda``, ``runpod`` or ``lyceum``)."""
    if name == "lambda":
        from pytest_gpucloud.sim.dialects.lambda_cloud import LambdaDialect

        return LambdaDialect(desk)
    if name == "runpod":
        from pytest_gpucloud.sim.dialects.runpod import RunPodDialect

        return RunPodDialect(desk)
    if name == "lyceum":
        from pytest_gpucloud.sim.dialects.lyceum import LyceumDialect

        return LyceumDialect(desk)
    raise ValueError(f"unknown dialect {name!r}")
