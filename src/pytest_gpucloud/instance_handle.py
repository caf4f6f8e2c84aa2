"""``gpu_cloud.instance(spec)``: an instance of the session's fleet for a local test to drive.

The instance is leased whole from the fleet (:meth:`~pytest_gpucloud.fleet.Fleet.
lease_exclusive`): created, booted and synced like any, billed and reported with the others,
deleted when the ``with`` block ends (or with the fleet, whatever ends the session). Commands
run over the fleet's SSH connection to it, in the synced workspace, inside the container of
``--gpu-runtime`` if there is one.

:meth:`InstanceHandle.call` ships a callable with cloudpickle: the image needs python3 and
cloudpickle (install it with ``--gpu-setup`` if it has none), at the Python minor version of
this machine when the callable travels by value. Its value comes back pickled and is
unpickled here: this side trusts the pickles of an instance it created itself and reaches
with a pinned host key, and of no one else.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import posixpath
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from pytest_gpucloud.errors import GpuCloudError, InstanceError
from pytest_gpucloud.transport.filepipe import pull, push

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from pytest_gpucloud.engine import Engine
    from pytest_gpucloud.fleet import Fleet
    from pytest_gpucloud.machine import Machine
    from pytest_gpucloud.request import GpuRequest

LEASE_MARGIN_S = 120.0
RELEASE_TIMEOUT_S = 120.0
NO_CLOUDPICKLE = 3  # the loader's exit status when the image has no cloudpickle

# Runs on the instance: the call arrives pickled on stdin; its value or exception goes
# back pickled on the original stdout, which the callable's own prints cannot reach.
_LOADER = """
import os, pickle, sys, traceback
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
try:
    import cloudpickle
except ImportError:
    sys.stderr.write("cloudpickle is not installed on the instance")
    sys.exit(3)
fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())
try:
    answer = ("ok", fn(*args, **kwargs))
    data = cloudpickle.dumps(answer)
except BaseException as exc:
    text = traceback.format_exc()
    try:
        data = cloudpickle.dumps(("raised", exc, text))
    except Exception:
        data = cloudpickle.dumps(("raised", None, text))
out.write(data)
out.flush()
"""


@dataclass(frozen=True)
class CommandResult:
    """What :meth:`InstanceHandle.run` gives: the output, decoded, and the exit code
    (negative: killed by that signal)."""

    stdout: str
    stderr: str
    exit_code: int


class RemoteCallError(Exception):
    """A callable raised on the instance an exception that cannot be rebuilt here; its
    message holds the remote traceback."""


class RemoteTraceback(Exception):
    """The traceback on the instance, as the cause of an exception re-raised here."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


class InstanceHandle:
    """One leased instance: run commands, copy files both ways, call Python there.

    Relative remote paths are relative to the synced workspace (the project as on this
    machine). ``timeout``: the default limit of each call, ``--gpu-timeout``.
    """

    def __init__(self, engine: Engine, machine: Machine, timeout: float, rootdir: Path) -> None:
        self._engine = engine
        self._machine = machine
        self._rootdir = rootdir
        self.timeout = timeout

    @property
    def id(self) -> str:
        return self._machine.id

    @property
    def gpu(self) -> str:
        return self._machine.label

    @property
    def workspace(self) -> str:
        """The synced workspace's absolute path on the instance."""
        return self._machine.remote_root

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run a shell command line in the workspace; a non-zero exit is no error here."""
        done = self._do(self._exec(command, None), timeout)
        code = done.returncode if done.returncode is not None else -1
        return CommandResult(_text(done.stdout), _text(done.stderr), code)

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy a local file to the file ``remote``, or a local folder's files into the
        folder ``remote``."""
        self._do(push(self._conn, Path(local), self._path(remote)), None)

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy the file ``remote`` to the local file ``local``, or the folder ``remote``'s
        files into the local folder ``local``. Only plain files come; the instance's paths
        cannot leave ``local``."""
        target = Path(local)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gpucloud-get-") as tmp:
            pulled = self._do(pull(self._conn, self._path(remote), Path(tmp)), None)
            if pulled.kind == "missing":
                raise FileNotFoundError(f"{remote}: no such file or folder on instance {self.id}")
            if pulled.kind == "file":
                os.replace(next(Path(tmp).iterdir()), target)
                return
            target.mkdir(exist_ok=True)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    dest = target / path.relative_to(tmp)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, dest)

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` run on the instance; its value, or its exception raised
        again here with the remote traceback in its message."""
        payload = _dumps((fn, args, kwargs), fn, self._rootdir)
        done = self._do(self._exec(f"python3 -c {shlex.quote(_LOADER)}", payload), None)
        if done.exit_status == NO_CLOUDPICKLE:
            raise InstanceError(
                f"instance {self.id}: python3 there has no cloudpickle, which call() needs; "
                "add it to the image or install it with --gpu-setup"
            )
        output = done.stdout if isinstance(done.stdout, bytes) else b""
        if done.exit_status != 0 or not output:
            tail = _text(done.stderr).strip().splitlines()[-8:]
            raise InstanceError(
                f"instance {self.id}: call() of {_name(fn)} ended with {_exit_text(done)}"
                + ("; its last output:\n" + "\n".join(tail) if tail else "")
            )
        answer = pickle.loads(output)
        if answer[0] == "ok":
            return answer[1]
        raise _reraised(answer[1], answer[2], self.id)

    @property
    def _conn(self) -> asyncssh.SSHClientConnection:
        if self._machine.conn is None:
            raise InstanceError(f"instance {self.id} has no SSH connection")
        return self._machine.conn

    def _path(self, remote: str) -> str:
        return posixpath.join(self.workspace, remote)

    async def _exec(self, command: str, stdin: bytes | None) -> asyncssh.SSHCompletedProcess:
        line = f"cd {shlex.quote(self.workspace)} && {command}"
        runtime = self._machine.runtime
        if runtime is not None:
            line = runtime.wrap(line)
        try:
            return await self._conn.run(line, input=stdin, encoding=None, check=False)
        except (OSError, asyncssh.Error) as exc:
            raise InstanceError(f"instance {self.id}: {exc}") from None

    def _do(self, coro: Any, timeout: float | None) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            return self._engine.run(coro, timeout=limit)
        except TimeoutError:
            raise InstanceError(
                f"instance {self.id}: no answer within {limit:g} s (pass timeout= or raise "
                "--gpu-timeout)"
            ) from None


@contextlib.contextmanager
def lease(engine: Engine, fleet: Fleet, request: GpuRequest) -> Iterator[InstanceHandle]:
    """An instance for ``request`` while the ``with`` block runs; deleted after it."""
    # Bring-up has limits of its own; this one covers them all: boot, --gpu-setup, the rest.
    limit = fleet.settings.boot_timeout + fleet.settings.timeout + LEASE_MARGIN_S
    try:
        machine = engine.run(fleet.lease_exclusive(request), timeout=limit)
    except TimeoutError:
        raise InstanceError(f"no instance for {request.spec} within {limit:g} s") from None
    try:
        yield InstanceHandle(engine, machine, fleet.settings.timeout, fleet.launcher.rootdir)
    finally:
        with contextlib.suppress(TimeoutError, GpuCloudError):
            engine.run(fleet.release_lease(machine), timeout=RELEASE_TIMEOUT_S)


def _dumps(value: Any, fn: Callable[..., Any], rootdir: Path) -> bytes:
    """Pickle with cloudpickle; ``fn``'s own module by value when it is the project's (a
    test module, a conftest: the instance may not import it under the same name)."""
    import cloudpickle  # here: a session that never calls pays nothing for it

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    by_value = module is not None and path is not None and Path(path).is_relative_to(rootdir)
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return bytes(cloudpickle.dumps(value))
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def _reraised(exc: BaseException | None, remote_traceback: str, instance_id: str) -> BaseException:
    header = f"(raised on instance {instance_id}; remote traceback:)\n{remote_traceback}"
    if exc is None:
        last = remote_traceback.strip().splitlines()[-1] if remote_traceback.strip() else "?"
        return RemoteCallError(f"{last}\n\n{header}")
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n\n{header}",)
    exc.__cause__ = RemoteTraceback(remote_traceback)
    return exc


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _exit_text(done: asyncssh.SSHCompletedProcess) -> str:
    if done.exit_signal is not None:
        return f"signal {done.exit_signal[0]}"
    return f"exit status {done.exit_status}"
