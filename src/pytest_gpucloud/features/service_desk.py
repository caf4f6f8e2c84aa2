"""The servers of ``gpu_service``, run for the session by the process that owns the fleet.

Each server gets an instance of its own, leased whole from the fleet (billed, reported and
deleted with the rest). Its command runs there in the synced workspace,
inside the runtime's container if there is one, under ``remote/service.py``, which puts it in
a process group of its own, writes its output to a log in the workspace, says at once when
it ends, and stops the whole group (SIGTERM, then SIGKILL) when asked or when the SSH
channel goes. The port is forwarded to 127.0.0.1 here over the fleet's SSH connection
(``direct-tcpip``: no port of the instance is opened to anyone); with the ``local``
provider the server already is on this machine and its own port is used. At the end the
log comes home beside the session's artifacts.

One server per distinct definition: every process that asks for the same one (the session,
xdist workers through the fleet's socket) gets the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pytest_gpucloud.core.errors import PREFIX, GpuCloudError, ServiceError
from pytest_gpucloud.core.request import GpuRequest
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.features import instance_handle
from pytest_gpucloud.features.instance_handle import Lessor
from pytest_gpucloud.machine.runtime import Docker
from pytest_gpucloud.remote import source
from pytest_gpucloud.transport import forward

if TYPE_CHECKING:
    from pytest_gpucloud.machine.machine import Machine

SERVICE_DIR = ".gpucloud/services"  # in the workspace: never synced, mounted in containers
POLL_S = 0.5
POLL_TIMEOUT_S = 5.0
LAUNCH_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL
HURRY_WAIT_S = 1.0  # a signal ends the session: the deletes go out within 2 s
LOG_TAIL_LINES = 20
LOGS_MAX = 1 << 20
ANSWER_SHOWN = 200
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")  # the instance's text is untrusted


@dataclass(frozen=True)
class ServiceSpec:
    """One server as the ``gpu_service`` factory was asked for it."""

    cmd: str
    port: int
    health: str
    request: GpuRequest
    timeout: float
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # values may be secret

    @property
    def key(self) -> str:
        """Equal for equal definitions (the same server for everyone who asks)."""
        data = json.dumps([self.cmd, self.port, self.health, self.request.canonical(), self.env])
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """The log's name: the program's and the key's start (``vllm-3f2a1b0c``)."""
        words = self.cmd.split()
        program = re.sub(r"[^A-Za-z0-9_.-]", "", words[0].rsplit("/", 1)[-1]) if words else ""
        return f"{program or 'service'}-{self.key[:8]}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "request": self.request.canonical(), "env": dict(self.env)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceSpec:
        env = data["env"]
        if not isinstance(env, dict):
            raise TypeError(f"env {env!r}")
        return cls(
            str(data["cmd"]),
            int(data["port"]),
            str(data["health"]),
            GpuRequest.parse(str(data["request"])),
            float(data["timeout"]),
            tuple((str(k), str(v)) for k, v in env.items()),
        )


@dataclass(frozen=True)
class ServiceView:
    """A running server as the processes that use it see it (plain JSON data)."""

    key: str
    url: str
    instance: str
    gpu: str
    log: str  # where its log lands on this machine at the end


@dataclass(eq=False)
class _Running:
    spec: ServiceSpec
    machine: Machine
    process: asyncssh.SSHClientProcess[str]
    remote_log: str
    local_log: Path
    # For a server in a container: the launcher's Unix socket, as the instance reaches it
    # (through a short link: a socket's path has at most 107 bytes), and the link's folder.
    relay: str | None
    relay_dir: str | None
    url: str = ""
    listener: asyncssh.SSHListener | None = None
    # The launcher's last word: {"exited": status, "tail": text} or {"stopped": status};
    # {"lost": reason} when the channel ended without one.
    ended: asyncio.Future[dict[str, Any]] = field(default_factory=asyncio.Future)
    watcher: asyncio.Task[None] | None = None
    # Once started, the server holds its machine for the session: its stop releases it.
    holds_machine: bool = False
    closed: bool = False

    def view(self) -> ServiceView:
        return ServiceView(
            self.spec.key, self.url, self.machine.id, self.machine.label, str(self.local_log)
        )


@dataclass(frozen=True)
class ServiceHome:
    """Where the servers' logs come home, and whether the machines are this one (the
    ``local`` provider: a server is reached on its own port, without a forward)."""

    log_dir: Path
    this_machine: bool


class ServiceHost(Lessor, Protocol):
    """What the servers need of the fleet: machines leased whole, and their home."""

    async def service_home(self) -> ServiceHome:
        """Where logs come home; whether the fleet's machines are this one."""


class ServiceDesk:
    """Starts, serves and stops the session's servers; call it on the engine loop."""

    def __init__(self, host: ServiceHost) -> None:
        self._host = host
        self._services: dict[str, asyncio.Future[_Running]] = {}
        self._closing = False

    async def start(self, spec: ServiceSpec) -> ServiceView:
        """The server of ``spec``, started by the first caller and healthy; a server that
        could not start fails every caller alike (ServiceError)."""
        if self._closing:
            raise ServiceError(f"gpu_service({spec.cmd!r}): the session is ending")
        starting = self._services.get(spec.key)
        if starting is None or _stopped(starting):
            starting = self._services[spec.key] = asyncio.ensure_future(self._start(spec))
        # Shielded: one caller going away (a crashed xdist worker) stops no one's server.
        running = await asyncio.shield(starting)
        if running.ended.done():
            raise ServiceError(f"gpu_service({spec.cmd!r}) has ended: {_ending(running)}")
        return running.view()

    async def logs(self, key: str) -> str:
        """The server's log so far (its last MiB), read on the instance."""
        running = await self._running(key)
        command = f"tail -c {LOGS_MAX} {shlex.quote(running.remote_log)}"
        done = await instance_handle.run_on(running.machine, command, None)
        return done.stdout.decode(errors="replace")

    async def stop(self, key: str) -> None:
        """Stop the server, bring its log home, release its instance; idempotent."""
        await self._stop(await self._running(key))

    async def close(self, *, hurry: bool = False) -> None:
        """Stop every server (the session ends). ``hurry`` (a signal ends the session):
        give each launcher a second to send its server SIGTERM, and leave the logs; the
        instances' deletes must go out at once."""
        self._closing = True
        for starting in self._services.values():
            starting.cancel()  # a start under way gives up; a finished one is unaffected
        done = await asyncio.gather(*self._services.values(), return_exceptions=True)
        running = [r for r in done if isinstance(r, _Running)]
        await asyncio.gather(*(self._stop(r, hurry=hurry) for r in running))

    async def _running(self, key: str) -> _Running:
        starting = self._services.get(key)
        if starting is None or not starting.done() or starting.cancelled():
            raise ServiceError(f"no running gpu_service has the key {key}")
        if starting.exception() is not None:
            raise ServiceError(f"no running gpu_service has the key {key}")
        return starting.result()

    async def _start(self, spec: ServiceSpec) -> _Running:
        try:
            return await self._bring_up(spec)
        except ServiceError:
            raise
        except GpuCloudError as exc:  # no instance, no forward: say for which server
            text = str(exc).removeprefix(PREFIX)
            raise ServiceError(f"gpu_service({spec.cmd!r}): {text}") from None

    async def _bring_up(self, spec: ServiceSpec) -> _Running:
        home = await self._host.service_home()
        machine = (await self._host.lease(spec.request)).machine
        running: _Running | None = None
        try:
            running = await _launch(machine, spec, home.log_dir)
            running.url = await _reach(machine, running, home.this_machine)
            await _wait_healthy(running)
        except BaseException:
            with contextlib.suppress(GpuCloudError):
                if running is not None:
                    await _end(running)
                await self._host.release_lease(machine)
            raise
        running.holds_machine = True
        return running

    async def _stop(self, running: _Running, *, hurry: bool = False) -> None:
        await _end(running, hurry=hurry)
        if running.holds_machine:
            running.holds_machine = False
            with contextlib.suppress(GpuCloudError):
                await self._host.release_lease(running.machine)


def _stopped(starting: asyncio.Future[_Running]) -> bool:
    """Whether this server was started and then stopped (asked for again, it starts anew)."""
    if not starting.done() or starting.cancelled() or starting.exception() is not None:
        return False
    return starting.result().closed


async def _launch(machine: Machine, spec: ServiceSpec, log_dir: Path) -> _Running:
    """Start ``spec.cmd`` on ``machine`` under the launcher; back when it runs."""
    folder = f"{machine.remote_root}/{SERVICE_DIR}"
    remote_log = f"{folder}/{spec.name}.log"
    relay = relay_dir = None
    socket_name = f"{SERVICE_DIR}/{spec.key[:8]}.sock"  # relative to the workspace
    if isinstance(machine.runtime, Docker):  # and podman: a network of the container's own
        relay_dir = await forward.short_link(instance_handle.machine_conn(machine), folder)
        relay = f"{relay_dir}/s/{spec.key[:8]}.sock"
    line = (
        f"cd {shlex.quote(machine.remote_root)} && mkdir -p {SERVICE_DIR} && "
        f"exec python3 -c {shlex.quote(source('service'))}"
    )
    if machine.runtime is not None:
        line = machine.runtime.wrap(line)
    conn = instance_handle.machine_conn(machine)
    try:
        process = await conn.create_process(line, encoding="utf-8")
    except (OSError, asyncssh.Error) as exc:
        raise ServiceError(f"instance {machine.id}: cannot start gpu_service: {exc}") from None
    config = {
        "cmd": spec.cmd,
        "log": remote_log,
        "env": dict(spec.env),
        "grace": STOP_GRACE_S,
        "port": spec.port,
        "relay": socket_name if relay else None,
    }
    process.stdin.write(json.dumps(config) + "\n")
    local_log = log_dir / f"{spec.name}.log"
    running = _Running(spec, machine, process, remote_log, local_log, relay, relay_dir)
    running.watcher = asyncio.ensure_future(_watch(running))
    return running


async def _watch(running: _Running) -> None:
    """Read the launcher's answers until its last word."""
    process, ended = running.process, running.ended
    try:
        while line := await process.stdout.readline():
            answer = json.loads(line)
            if "exited" in answer or "stopped" in answer:
                ended.set_result(answer)
                return
    except (OSError, asyncssh.Error, ValueError) as exc:
        ended.set_result({"lost": str(exc) or type(exc).__name__})
        return
    stderr = (await _rest(process.stderr)).strip()
    ended.set_result({"lost": stderr[-2000:] or "the launcher's channel closed"})


async def _rest(stream: asyncssh.SSHReader[str]) -> str:
    with contextlib.suppress(OSError, asyncssh.Error, asyncio.TimeoutError):
        return await asyncio.wait_for(stream.read(), 2)
    return ""


async def _reach(machine: Machine, running: _Running, this_machine: bool) -> str:
    """The server's URL here: a forward to the launcher's relay socket (in a container
    with a network of its own), its own port (``local``: on this machine), or a forward
    to its port on the instance's loopback."""
    port = running.spec.port
    if running.relay is None and this_machine:
        return f"http://127.0.0.1:{port}"
    conn = instance_handle.machine_conn(machine)
    if running.relay is not None:
        running.listener = await forward.forward_socket(conn, running.relay)
    else:
        running.listener = await forward.forward_port(conn, port)
    return f"http://127.0.0.1:{running.listener.get_port()}"


async def _wait_healthy(running: _Running) -> None:
    """Poll the health path every 0.5 s until it answers 200; the server's end, or the
    timeout, raise ServiceError at once."""
    import httpx  # here: a session without gpu_service (or with the ssh provider) never loads it

    spec = running.spec
    started = time.monotonic()
    last = "none (no connection yet)"
    async with httpx.AsyncClient(timeout=POLL_TIMEOUT_S, trust_env=False) as client:
        while not running.ended.done():
            try:
                answer = await client.get(running.url + spec.health)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__} ({_shown(str(exc)) or 'no detail'})"
            else:
                if answer.status_code == 200:
                    return
                last = f"HTTP {answer.status_code} {_shown(answer.text)!r}"
            waited = time.monotonic() - started
            if waited >= spec.timeout:
                raise ServiceError(
                    f"gpu_service({spec.cmd!r}) on {running.machine.label}: {spec.health} did "
                    f"not answer 200 within {spec.timeout:g} s (waited {waited:.1f} s); the "
                    f"last answer: {last}" + await _log_tail(running) + _whole_log(running)
                )
            await asyncio.wait({running.ended}, timeout=POLL_S)
    raise ServiceError(
        f"gpu_service({spec.cmd!r}) on {running.machine.label} ended before {spec.health} "
        f"answered 200: {_ending(running)}"
        + _tail_text(running.ended.result().get("tail"))
        + _whole_log(running)
    )


async def _log_tail(running: _Running) -> str:
    with contextlib.suppress(GpuCloudError, asyncio.TimeoutError):
        command = f"tail -n {LOG_TAIL_LINES} {shlex.quote(running.remote_log)}"
        done = await asyncio.wait_for(instance_handle.run_on(running.machine, command, None), 10)
        return _tail_text(done.stdout.decode(errors="replace"))
    return ""


def _tail_text(text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        return "; its log is empty"
    lines = _UNPRINTABLE.sub("?", text).rstrip().splitlines()[-LOG_TAIL_LINES:]
    return "; its log ends:\n" + "\n".join(f"    {line}" for line in lines)


def _whole_log(running: _Running) -> str:
    return f"\n(the whole log comes home to {running.local_log})"


def _ending(running: _Running) -> str:
    last = running.ended.result()
    if "exited" in last:
        status = int(last["exited"])
        return f"exit status {status}" if status >= 0 else f"killed by signal {-status}"
    if "stopped" in last:
        return "stopped"
    return f"its connection was lost ({_shown(str(last.get('lost')))})"


def _shown(text: str) -> str:
    return _UNPRINTABLE.sub("?", text[:ANSWER_SHOWN])


async def _end(running: _Running, *, hurry: bool = False) -> None:
    """Stop the launcher (and with it the server's group), close the forward, bring the
    log home (not in a ``hurry``); idempotent."""
    if running.closed:
        return
    running.closed = True
    if not running.ended.done():
        with contextlib.suppress(OSError, asyncssh.Error):
            running.process.stdin.write("stop\n")
        # In a hurry, long enough for the launcher to send its SIGTERM: an exec server
        # may kill the launcher as soon as its channel closes (the sim's and local's do).
        with contextlib.suppress(asyncio.TimeoutError):
            wait = HURRY_WAIT_S if hurry else STOP_GRACE_S + 5
            await asyncio.wait_for(asyncio.shield(running.ended), wait)
    if running.listener is not None:
        running.listener.close()
        running.listener = None
    running.process.close()  # a launcher still there takes its stdin's end as a stop
    if running.watcher is not None:
        running.watcher.cancel()
    if not running.ended.done():
        running.ended.set_result({"stopped": None})
    if hurry:
        return
    if running.relay_dir is not None:
        with contextlib.suppress(GpuCloudError):
            conn = instance_handle.machine_conn(running.machine)
            await forward.remove_link(conn, running.relay_dir)
        running.relay_dir = None
    with contextlib.suppress(GpuCloudError, asyncio.TimeoutError):
        target = running.local_log.parent
        pulled = instance_handle.pull_from(
            running.machine, running.remote_log, target, instance_handle.GET_MAX_BYTES
        )
        await asyncio.wait_for(pulled, 60)
