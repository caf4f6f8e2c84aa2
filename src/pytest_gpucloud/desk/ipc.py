"""The fleet over a local socket, for pytest-xdist workers.

xdist's controller owns the fleet (and with it the API key and SSH keys); its workers own
the items. A worker reaches the controller's :class:`~pytest_gpucloud.desk.service.FleetService`
through a Unix socket in a private directory (the directory 0700, the socket 0600). The
socket's path and a random token reach the worker in ``workerinput``; a connection whose
first frame does not carry the token is closed unanswered.

Frames are the JSON lines of ``remote/protocol.py``, one answer per request:

worker -> controller:
  hello  {"token": str, "owner": str}   first, once; ``owner``: the xdist worker id
  plan   {"tests": [[nodeid, canonical request or null (a local test)], ...],
          "services": [[cmd, canonical request], ...]}   the gpu_service servers declared
  run    {"nodeid": str, "request": canonical request, "nextid": str|None}
  instances {}
  lease  {"request": canonical request}  ``gpu_cloud.instance()``: a machine of its own
  exec   {"id", "command": str, "stdin": base64|None, "timeout": float}
  push   {"id", "local": path, "remote": path, "timeout": float}
  pull   {"id", "remote": path, "local": folder, "timeout": float}
  release {"id"}
  service {"spec": ServiceSpec as a dict}  ``gpu_service(...)``: the shared server
  service_logs {"key"}
  service_stop {"key"}
controller -> worker:
  planned {"errors": {nodeid: message}}
  result  {"result": RunResult as a dict}
  instances {"instances": [InstanceView as a dict]}
  leased  {"id", "label", "workspace", "timeout", "rootdir"}
  service {ServiceView as a dict}
  logs    {"text": str}
  done    {Completed as a dict} for exec; {"what": file|dir|missing} for pull; {} else
  error   {"message": str}              the request failed (a ``gpu-cloud:`` message)

A worker that goes away while its test runs (a crash, a kill) has that run cancelled, and
the machines it leased released; the ``gpu_service`` servers are the session's, not the
worker's, and run on until the session ends (or a ``service_stop``). Paths in ``push`` and
``pull`` are this machine's: the controller reads and writes them for the worker (same
machine, same user).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import io
import os
import secrets
import shutil
import socket
import tempfile
from base64 import b64decode, b64encode
from collections.abc import Coroutine, Sequence
from pathlib import Path
from traceback import format_exc
from typing import TYPE_CHECKING, Any, TypedDict

from pytest_gpucloud.core.errors import PREFIX, GpuCloudError, InstanceError, ServiceError
from pytest_gpucloud.core.request import GpuRequest
from pytest_gpucloud.desk.service import InstanceView, RunResult
from pytest_gpucloud.features import instance_handle
from pytest_gpucloud.features.gpu_service import Declared
from pytest_gpucloud.features.instance_handle import Completed, InstanceHandle, leased, within
from pytest_gpucloud.features.service_desk import ServiceSpec, ServiceView
from pytest_gpucloud.remote.protocol import Message, decode, encode

if TYPE_CHECKING:
    from pytest_gpucloud.core.request import Tests
    from pytest_gpucloud.desk.service import FleetService
    from pytest_gpucloud.machine.machine import Machine

# Requests are small; a plan of a very large suite is the largest.
REQUEST_LIMIT = 64 * 1024 * 1024


class Handoff(TypedDict):
    """What an xdist worker is given to reach the fleet: no key, no secret but the token."""

    socket: str
    token: str
    provider: str


class IpcServer:
    """Serves a :class:`FleetService` on a Unix socket; start and close it on the engine loop."""

    def __init__(self, service: FleetService, provider: str) -> None:
        self._service = service
        self._dir = tempfile.mkdtemp(prefix="gpucloud-")
        self.handoff = Handoff(
            socket=os.path.join(self._dir, "fleet.sock"),
            token=secrets.token_hex(32),
            provider=provider,
        )
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._releases: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # The directory is 0700 already, so the socket is private before its chmod too.
        self._server = await asyncio.start_unix_server(
            self._serve, path=self.handoff["socket"], limit=REQUEST_LIMIT
        )
        os.chmod(self.handoff["socket"], 0o600)

    async def close(self) -> None:
        """Stop listening, cancel the requests in flight, finish releasing the leases of
        workers that went away, remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in self._clients:
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        # The leases of workers gone meanwhile (the fleet deletes whatever is left anyway).
        await asyncio.gather(*self._releases, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        leases: dict[str, Machine] = {}
        try:
            hello = await _read(reader)
            if hello is None or not self._admits(hello):
                return
            owner = str(hello.get("owner", "?"))
            while (request := await _read(reader)) is not None:
                answer = await _unless_gone(reader, self._answer(request, owner, leases))
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (OSError, ValueError):  # gone, or not speaking the protocol
            return
        finally:
            self._clients.discard(task)
            writer.close()
            for machine in leases.values():  # the worker is gone: so are its leases
                self._release_later(machine)

    def _admits(self, hello: Message) -> bool:
        token = hello.get("token")
        return (
            hello["type"] == "hello"
            and isinstance(token, str)
            and hmac.compare_digest(token.encode(), self.handoff["token"].encode())
        )

    async def _answer(self, request: Message, owner: str, leases: dict[str, Machine]) -> bytes:
        kind = request["type"]
        try:
            work = self._work(kind, request, owner, leases)
        except (KeyError, TypeError, ValueError) as exc:
            return encode("error", message=f"{PREFIX}malformed {kind} request ({exc!r})")
        try:
            return await work
        except GpuCloudError as exc:
            return encode("error", message=str(exc))
        except Exception:  # a bug: the worker shows it, rather than a closed socket
            return encode(
                "error", message=f"{PREFIX}the fleet failed on a {kind} request:\n{format_exc()}"
            )

    def _work(
        self, kind: str, request: Message, owner: str, leases: dict[str, Machine]
    ) -> Coroutine[Any, Any, bytes]:
        """The answer to ``request``, to be awaited; a malformed one raises here."""
        if kind == "plan":
            tests = [
                (str(nodeid), None if text is None else GpuRequest.parse(text))
                for nodeid, text in request["tests"]
            ]
            services = [
                Declared(str(cmd), GpuRequest.parse(text))
                for cmd, text in request.get("services", [])
            ]
            return self._planned(tests, services)
        if kind == "run":
            nextid = request["nextid"]
            if nextid is not None and not isinstance(nextid, str):
                raise TypeError(f"nextid {nextid!r}")
            args = (str(request["nodeid"]), GpuRequest.parse(request["request"]), nextid)
            return self._result(*args, owner)
        if kind == "instances":
            return self._instances()
        if kind == "lease":
            return self._lease(GpuRequest.parse(request["request"]), leases)
        if kind in ("exec", "push", "pull", "release"):
            return self._on_lease(kind, request, leases[str(request["id"])], leases)
        if kind == "service":
            return self._service_started(ServiceSpec.from_json(request["spec"]))
        if kind == "service_logs":
            return self._service_logs(str(request["key"]))
        if kind == "service_stop":
            return self._service_stopped(str(request["key"]))
        raise ValueError(f"unknown request {kind!r}")

    async def _planned(self, tests: Tests, services: list[Declared]) -> bytes:
        return encode("planned", errors=await self._service.plan(tests, services))

    async def _service_started(self, spec: ServiceSpec) -> bytes:
        view = await self._service.services.start(spec)
        return encode("service", **dataclasses.asdict(view))

    async def _service_logs(self, key: str) -> bytes:
        return encode("logs", text=await self._service.services.logs(key))

    async def _service_stopped(self, key: str) -> bytes:
        await self._service.services.stop(key)
        return encode("done")

    async def _result(
        self, nodeid: str, request: GpuRequest, nextid: str | None, owner: str
    ) -> bytes:
        result = await self._service.run(nodeid, request, nextid, owner)
        return encode("result", result=result.to_json())

    async def _instances(self) -> bytes:
        views = await self._service.instances()
        return encode("instances", instances=[dataclasses.asdict(v) for v in views])

    async def _lease(self, request: GpuRequest, leases: dict[str, Machine]) -> bytes:
        lease = await self._service.lease(request)
        machine = leases[lease.machine.id] = lease.machine
        return encode(
            "leased",
            id=machine.id,
            label=machine.label,
            workspace=machine.remote_root,
            timeout=lease.timeout,
            rootdir=str(lease.rootdir),
        )

    async def _on_lease(
        self, kind: str, request: Message, machine: Machine, leases: dict[str, Machine]
    ) -> bytes:
        """exec, push, pull or release on a machine this worker leased."""
        if kind == "release":
            leases.pop(machine.id, None)
            await self._service.release_lease(machine)
            return encode("done")
        timeout = float(request["timeout"])
        if kind == "exec":
            stdin = request["stdin"]
            ran = instance_handle.run_on(
                machine, str(request["command"]), None if stdin is None else b64decode(stdin)
            )
            return encode("done", **(await within(ran, timeout, machine.id)).to_json())
        if kind == "push":
            pushed = instance_handle.push_to(
                machine, Path(request["local"]), str(request["remote"])
            )
            await within(pushed, timeout, machine.id)
            return encode("done")
        pulled = instance_handle.pull_from(machine, str(request["remote"]), Path(request["local"]))
        return encode("done", what=await within(pulled, timeout, machine.id))

    def _release_later(self, machine: Machine) -> None:
        async def release() -> None:
            with contextlib.suppress(GpuCloudError):
                await self._service.release_lease(machine)

        task = asyncio.ensure_future(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


async def _read(reader: asyncio.StreamReader) -> Message | None:
    line = await reader.readline()
    return decode(line) if line else None


async def _unless_gone(
    reader: asyncio.StreamReader, work: Coroutine[Any, Any, bytes]
) -> bytes | None:
    """``work``'s answer, or None (and ``work`` cancelled) if the client hangs up first.

    A client sends nothing while it waits for an answer, so anything readable is its end.
    """
    answer = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({answer, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Both settled before the next read: a pending read would refuse another.
        for pending in (answer, hangup):
            pending.cancel()
        await asyncio.gather(answer, hangup, return_exceptions=True)
    return None if answer.cancelled() else answer.result()


class IpcClient:
    """An xdist worker's :class:`~pytest_gpucloud.desk.service.FleetAccess`: the controller's
    fleet over its socket. Blocking; connects on first use."""

    def __init__(self, handoff: Handoff, owner: str) -> None:
        self._handoff = handoff
        self._owner = owner
        self._stream: io.BufferedRWPair | None = None

    def plan(self, tests: Tests, services: Sequence[Declared] = ()) -> dict[str, str]:
        listed = [[nodeid, r.canonical() if r else None] for nodeid, r in tests]
        declared = [[s.cmd, s.request.canonical()] for s in services]
        answer = self._ask(encode("plan", tests=listed, services=declared))
        if answer["type"] != "planned":
            raise GpuCloudError(str(answer.get("message")))
        return {str(nodeid): str(message) for nodeid, message in answer["errors"].items()}

    def run(self, nodeid: str, request: GpuRequest, nextid: str | None) -> RunResult:
        try:
            answer = self._ask(
                encode("run", nodeid=nodeid, request=request.canonical(), nextid=nextid)
            )
        except GpuCloudError as exc:
            return RunResult(nodeid, error=str(exc))
        if answer["type"] != "result":
            return RunResult(nodeid, error=str(answer.get("message")))
        return RunResult.from_json(answer["result"])

    def instances(self) -> list[InstanceView]:
        answer = self._ask(encode("instances"))
        if answer["type"] != "instances":
            raise GpuCloudError(str(answer.get("message")))
        return [InstanceView(**view) for view in answer["instances"]]

    def lease(self, request: GpuRequest) -> contextlib.AbstractContextManager[InstanceHandle]:
        answer = self.ask("leased", encode("lease", request=request.canonical()))
        link = IpcInstanceLink(self, str(answer["id"]), str(answer["label"]), answer["workspace"])
        return leased(link, float(answer["timeout"]), Path(answer["rootdir"]))

    def start_service(self, spec: ServiceSpec) -> ServiceView:
        answer = self.ask("service", encode("service", spec=spec.to_json()), ServiceError)
        return ServiceView(**{f: str(answer[f]) for f in ServiceView.__dataclass_fields__})

    def service_logs(self, key: str) -> str:
        return str(self.ask("logs", encode("service_logs", key=key), ServiceError)["text"])

    def stop_service(self, key: str) -> None:
        self.ask("done", encode("service_stop", key=key), ServiceError)

    def ask(
        self, expected: str, request: bytes, error: type[GpuCloudError] = InstanceError
    ) -> Message:
        """The answer to ``request``, of type ``expected``; an error answer raises it as
        ``error``."""
        answer = self._ask(request)
        if answer["type"] != expected:
            raise error(str(answer.get("message")))
        return answer

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError):  # its unsent bytes may find no one to read them
                self._stream.close()
            self._stream = None

    def _ask(self, request: bytes) -> Message:
        stream = self._connect()
        try:
            stream.write(request)
            stream.flush()
            line = stream.readline()
        except OSError as exc:
            self.close()
            raise GpuCloudError(
                f"lost the xdist controller's fleet socket {self._handoff['socket']} ({exc})"
            ) from None
        if not line:
            self.close()
            raise GpuCloudError("the xdist controller closed the fleet's socket")
        return decode(line)

    def _connect(self) -> io.BufferedRWPair:
        if self._stream is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._handoff["socket"])
            except OSError as exc:
                sock.close()
                raise GpuCloudError(
                    f"cannot reach the xdist controller's fleet at {self._handoff['socket']} "
                    f"({exc}); gpu tests need xdist workers on the controller's machine"
                ) from None
            stream = sock.makefile("rwb")
            sock.close()  # the file keeps the connection open
            stream.write(encode("hello", token=self._handoff["token"], owner=self._owner))
            self._stream = stream
        return self._stream


class IpcInstanceLink:
    """An :class:`~pytest_gpucloud.features.instance_handle.InstanceLink` to a machine leased by the
    xdist controller for this worker: each call goes over the fleet's socket."""

    def __init__(self, client: IpcClient, instance_id: str, label: str, workspace: str) -> None:
        self._client = client
        self.id = instance_id
        self.label = label
        self.workspace = workspace

    def exec(self, command: str, stdin: bytes | None, timeout: float) -> Completed:
        data = None if stdin is None else b64encode(stdin).decode()
        request = encode("exec", id=self.id, command=command, stdin=data, timeout=timeout)
        return Completed.from_json(self._client.ask("done", request))

    def push(self, local: Path, remote: str, timeout: float) -> None:
        local_path = str(local.absolute())
        request = encode("push", id=self.id, local=local_path, remote=remote, timeout=timeout)
        self._client.ask("done", request)

    def pull(self, remote: str, local_dir: Path, timeout: float) -> str:
        folder = str(local_dir.absolute())
        request = encode("pull", id=self.id, remote=remote, local=folder, timeout=timeout)
        return str(self._client.ask("done", request)["what"])

    def release(self) -> None:
        with contextlib.suppress(GpuCloudError):
            self._client.ask("done", encode("release", id=self.id))
