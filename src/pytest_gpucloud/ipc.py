"""The fleet over a local socket, for pytest-xdist workers.

xdist's controller owns the fleet (and with it the API key and SSH keys); its workers own
the items. A worker reaches the controller's :class:`~pytest_gpucloud.service.FleetService`
through a Unix socket in a private directory (the directory 0700, the socket 0600). The
socket's path and a random token reach the worker in ``workerinput``; a connection whose
first frame does not carry the token is closed unanswered.

Frames are the JSON lines of ``remote/protocol.py``, one answer per request:

worker -> controller:
  hello  {"token": str, "owner": str}   first, once; ``owner``: the xdist worker id
  plan   {"tests": [[nodeid, canonical request or null (a local test)], ...]}
  run    {"nodeid": str, "request": canonical request, "nextid": str|None}
  instances {}
controller -> worker:
  planned {"errors": {nodeid: message}}
  result  {"result": RunResult as a dict}
  instances {"instances": [InstanceView as a dict]}
  error   {"message": str}              the request failed (a ``gpu-cloud:`` message)

A worker that goes away while its test runs (a crash, a kill) has that run cancelled.
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
from collections.abc import Coroutine
from traceback import format_exc
from typing import TYPE_CHECKING, Any, TypedDict

from pytest_gpucloud.errors import PREFIX, GpuCloudError
from pytest_gpucloud.remote.protocol import Message, decode, encode
from pytest_gpucloud.request import GpuRequest
from pytest_gpucloud.service import InstanceView, RunResult

if TYPE_CHECKING:
    from pytest_gpucloud.service import FleetService, Tests

# The key under which a worker's ``workerinput`` carries its :class:`Handoff`.
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

    async def start(self) -> None:
        # The directory is 0700 already, so the socket is private before its chmod too.
        self._server = await asyncio.start_unix_server(
            self._serve, path=self.handoff["socket"], limit=REQUEST_LIMIT
        )
        os.chmod(self.handoff["socket"], 0o600)

    async def close(self) -> None:
        """Stop listening, cancel the requests in flight, remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in self._clients:
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            hello = await _read(reader)
            if hello is None or not self._admits(hello):
                return
            owner = str(hello.get("owner", "?"))
            while (request := await _read(reader)) is not None:
                answer = await _unless_gone(reader, self._answer(request, owner))
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (OSError, ValueError):  # gone, or not speaking the protocol
            return
        finally:
            self._clients.discard(task)
            writer.close()

    def _admits(self, hello: Message) -> bool:
        token = hello.get("token")
        return (
            hello["type"] == "hello"
            and isinstance(token, str)
            and hmac.compare_digest(token.encode(), self.handoff["token"].encode())
        )

    async def _answer(self, request: Message, owner: str) -> bytes:
        kind = request["type"]
        try:
            work = self._work(kind, request, owner)
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

    def _work(self, kind: str, request: Message, owner: str) -> Coroutine[Any, Any, bytes]:
        """The answer to ``request``, to be awaited; a malformed one raises here."""
        if kind == "plan":
            tests = [
                (str(nodeid), None if text is None else GpuRequest.parse(text))
                for nodeid, text in request["tests"]
            ]
            return self._planned(tests)
        if kind == "run":
            nextid = request["nextid"]
            if nextid is not None and not isinstance(nextid, str):
                raise TypeError(f"nextid {nextid!r}")
            args = (str(request["nodeid"]), GpuRequest.parse(request["request"]), nextid)
            return self._result(*args, owner)
        if kind == "instances":
            return self._instances()
        raise ValueError(f"unknown request {kind!r}")

    async def _planned(self, tests: Tests) -> bytes:
        return encode("planned", errors=await self._service.plan(tests))

    async def _result(
        self, nodeid: str, request: GpuRequest, nextid: str | None, owner: str
    ) -> bytes:
        result = await self._service.run(nodeid, request, nextid, owner)
        return encode("result", result=result.to_json())

    async def _instances(self) -> bytes:
        views = await self._service.instances()
        return encode("instances", instances=[dataclasses.asdict(v) for v in views])


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
    """An xdist worker's :class:`~pytest_gpucloud.service.FleetAccess`: the controller's
    fleet over its socket. Blocking; connects on first use."""

    def __init__(self, handoff: Handoff, owner: str) -> None:
        self._handoff = handoff
        self._owner = owner
        self._stream: io.BufferedRWPair | None = None

    def plan(self, tests: Tests) -> dict[str, str]:
        listed = [[nodeid, r.canonical() if r else None] for nodeid, r in tests]
        answer = self._ask(encode("plan", tests=listed))
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
