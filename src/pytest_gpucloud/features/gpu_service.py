"""The ``gpu_service`` fixture: a server deployed on a GPU instance, tested from here.

``gpu_service(cmd, port=8000, spec="L4")`` starts ``cmd`` on an instance of the session's
fleet and gives a :class:`GpuService` whose ``url`` reaches it from this machine (see
:mod:`~pytest_gpucloud.features.service_desk` for how). The factory is session-scoped, and
so are its servers: each runs until the session ends, or until its :meth:`GpuService.stop`.
Asking again for the same definition gives the same server, also from other xdist workers.

Servers are planned at collection: :func:`declared` reads the ``gpu_service(...)`` calls in
the source of the fixtures (and tests) that request the factory, so ``--gpu-plan`` lists
their instances; a call whose command or spec is not a literal is planned with what is
literal, or not at all (see :func:`declared`).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pytest_gpucloud.core.errors import PREFIX, MarkerError, ServiceError
from pytest_gpucloud.core.request import GpuRequest, parse_marker
from pytest_gpucloud.features.service_desk import ServiceSpec, ServiceView

if TYPE_CHECKING:
    import openai
    import pytest

FIXTURE = "gpu_service"
DEFAULT_TIMEOUT_S = 600.0  # model servers load weights first; vLLM's own tests wait 240 s
PLANNED_KEYWORDS = ("spec", "count", "vram", "image")
OPENAI_EXTRA = "pip install 'pytest-gpucloud[openai]'"


class ServiceAccess(Protocol):
    """How a process reaches the session's servers (the fleet's owner runs them)."""

    def start_service(self, spec: ServiceSpec) -> ServiceView:
        """The healthy server of ``spec``, started if need be; ServiceError if it cannot be."""

    def service_logs(self, key: str) -> str:
        """The server's log so far."""

    def stop_service(self, key: str) -> None:
        """Stop the server and release its instance; idempotent."""


class GpuService:
    """One server on a GPU instance, reached from this machine.

    ``url``: ``http://127.0.0.1:<port>`` here; ``base_url``: ``url + "/v1"`` (OpenAI-style
    servers); ``instance`` and ``gpu``: where it runs; ``log_path``: where its log lands
    here once it stops.
    """

    def __init__(self, access: ServiceAccess, view: ServiceView) -> None:
        self._access = access
        self._key = view.key
        self.url = view.url
        self.base_url = view.url + "/v1"
        self.instance = view.instance
        self.gpu = view.gpu
        self.log_path = view.log

    def logs(self) -> str:
        """What the server has written so far (stdout and stderr; its last MiB)."""
        return self._access.service_logs(self._key)

    def openai_client(self, **options: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for ``base_url`` (needs the ``openai`` extra)."""
        try:
            import openai
        except ImportError:
            raise ServiceError(
                f"openai_client() needs the openai package: {OPENAI_EXTRA}"
            ) from None
        options = {"api_key": "EMPTY", "max_retries": 0, **options}
        return openai.OpenAI(base_url=self.base_url, **options)

    def stop(self) -> None:
        """Stop the server now (for every process that uses it) and release its instance."""
        self._access.stop_service(self._key)

    def __repr__(self) -> str:
        return f"<GpuService {self.url} on {self.gpu}>"


class ServiceFactory:
    """What the ``gpu_service`` fixture gives: call it to start (or get) a server."""

    def __init__(self, access: ServiceAccess, owns_servers: bool) -> None:
        self._access = access
        # The fleet's own process stops its servers when the fixture ends; an xdist worker
        # leaves them to the controller, since other workers may still use them.
        self._owns = owns_servers
        self._started: list[GpuService] = []

    def __call__(
        self,
        cmd: str,
        *,
        port: int,
        health: str = "/health",
        spec: object = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        **options: object,
    ) -> GpuService:
        """Start ``cmd`` (a shell command line) in the synced workspace of an instance for
        ``spec`` (as the ``gpu`` marker's, with its ``count``, ``vram`` and ``image``), and
        wait until ``health`` on ``port`` answers 200, at most ``timeout`` seconds. ``env``
        is added to the server's environment (sent over SSH, never on a command line)."""
        service_spec = make_spec(cmd, port, health, spec, timeout, env, options)
        service = GpuService(self._access, self._access.start_service(service_spec))
        self._started.append(service)
        return service

    def close(self) -> None:
        if self._owns:
            for service in self._started:
                service.stop()
        self._started.clear()


def make_spec(
    cmd: object,
    port: object,
    health: object,
    spec: object,
    timeout: object,
    env: object,
    options: Mapping[str, object],
) -> ServiceSpec:
    """The checked definition of one server; bad input raises ServiceError naming it."""
    where = f"gpu_service({cmd!r})"
    if not isinstance(cmd, str) or not cmd.strip():
        raise ServiceError(f"gpu_service(cmd={cmd!r}): cmd must be a shell command line")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ServiceError(f"{where}: port={port!r} must be a TCP port number (1-65535)")
    if not isinstance(health, str) or not health.startswith("/"):
        raise ServiceError(f"{where}: health={health!r} must be a path such as '/health'")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ServiceError(f"{where}: timeout={timeout!r} must be a positive number of seconds")
    pairs = _env_pairs(where, env)
    try:
        request = parse_marker((spec,), options)
    except MarkerError as exc:
        raise ServiceError(f"{where}: {_unprefixed(exc)}") from None
    return ServiceSpec(cmd, port, health, request, float(timeout), pairs)


def _unprefixed(exc: Exception) -> str:
    return str(exc).removeprefix(PREFIX)


def _env_pairs(where: str, env: object) -> tuple[tuple[str, str], ...]:
    if env is None:
        return ()
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
    ):
        raise ServiceError(f"{where}: env must map variable names to strings")
    return tuple(sorted(env.items()))


@dataclass(frozen=True)
class Declared:
    """A server the session's code will ask for, as far as its source says."""

    cmd: str
    request: GpuRequest

    @property
    def name(self) -> str:
        return f"gpu_service({self.cmd!r})"


def declared(items: Iterable[pytest.Item]) -> list[Declared]:
    """The servers that ``items`` will ask for, for the plan.

    Read from the source of every fixture (and test) among the items' fixtures that requests
    ``gpu_service``: each ``gpu_service(...)`` call whose command and spec (and ``count``,
    ``vram``, ``image``) are literals. A call with a computed command or spec is left out
    of the plan (it still runs). Each definition is listed once.
    """
    seen: dict[tuple[str, GpuRequest], Declared] = {}
    functions: dict[Any, None] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or FIXTURE not in info.names_closure:
            continue
        for defs in info.name2fixturedefs.values():
            for fixturedef in defs:
                if FIXTURE in fixturedef.argnames:
                    functions.setdefault(fixturedef.func)
        if FIXTURE in info.argnames:
            functions.setdefault(getattr(item, "function", None))
    for function in functions:
        for found in _calls(function):
            seen.setdefault((found.cmd, found.request), found)
    return list(seen.values())


def _calls(function: Any) -> list[Declared]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return []
    found = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == FIXTURE
            and node.args
        ):
            continue
        literal = {k.arg: k.value for k in node.keywords if k.arg in PLANNED_KEYWORDS}
        try:
            cmd = ast.literal_eval(node.args[0])
            keywords = {name: ast.literal_eval(value) for name, value in literal.items()}
            spec = keywords.pop("spec", None)
            request = parse_marker((spec,), keywords)
        except (ValueError, MarkerError):
            continue
        if isinstance(cmd, str):
            found.append(Declared(cmd, request))
    return found
