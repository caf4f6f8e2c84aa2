"""``gpu_cloud.instance(spec)``: an instance of the session's fleet for a local test to drive.

The instance is leased whole from the fleet (:meth:`~pytest_gpucloud.scheduling.fleet.Fleet.
lease`): created, booted and synced like any, billed and reported with the others,
deleted when the ``with`` block ends (or with the fleet, whatever ends the session). Commands
run over the fleet's SSH connection to it, in the synced workspace, inside the container of
``--gpu-runtime`` if there is one. An :class:`InstanceHandle` drives an
:class:`InstanceLink`: the machine in this process (:class:`MachineLink`), or, in an xdist
worker, in the controller's (``ipc.IpcInstanceLink``, over the fleet's socket).

:meth:`InstanceHandle.call` ships a callable with cloudpickle: the image needs python3 and
cloudpickle (install it with ``--gpu-setup`` if it has none), at the Python minor version of
this machine when the callable travels by value. Its value comes back pickled and is
unpickled here through an allow-list (:mod:`pytest_gpucloud.features.safe_unpickle`): a
pinned host key does not make an instance honest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import posixpath
import shlex
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pytest_gpucloud.core.errors import GpuCloudError, InstanceError
from pytest_gpucloud.core.escape import visible
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.features.safe_unpickle import DisallowedGlobal, allowed_names, safe_loads
from pytest_gpucloud.transport.capped import run_capped
from pytest_gpucloud.transport.commands import Shell
from pytest_gpucloud.transport.files import pull, push

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator

    from pytest_gpucloud.core.engine import Engine
    from pytest_gpucloud.core.request import GpuRequest
    from pytest_gpucloud.machine.machine import Machine

T = TypeVar("T")
RELEASE_TIMEOUT_S = 120.0
GET_MAX_BYTES = 10**9  # what gpu.get() takes unless told otherwise
RUN_OUTPUT_MAX = 256 << 20  # of each stream of gpu.run() and gpu.call()
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
# Classes of a module that travelled by value come back by reference (module.Name), so
# this side's allow-list can name them.
name = getattr(fn, "__module__", None)
if name and name not in sys.modules and hasattr(fn, "__globals__"):
    import types
    module = types.ModuleType(name)
    module.__dict__.update(fn.__globals__)
    module.__file__ = "<gpucloud call>"
    sys.modules[name] = module
try:
    answer = ("ok", fn(*args, **kwargs))
    data = cloudpickle.dumps(answer)
except BaseException as exc:
    text = traceback.format_exc()
    try:
        data = cloudpickle.dumps(("raised", cloudpickle.dumps(exc), text))
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


@dataclass(frozen=True)
class Completed:
    """How a command ended on the instance: its output and exit status or signal."""

    stdout: bytes
    stderr: bytes
    exit_status: int | None
    exit_signal: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stdout": base64.b64encode(self.stdout).decode(),
            "stderr": base64.b64encode(self.stderr).decode(),
            "exit_status": self.exit_status,
            "exit_signal": self.exit_signal,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completed:
        status, exit_signal = data["exit_status"], data["exit_signal"]
        return cls(
            base64.b64decode(data["stdout"]),
            base64.b64decode(data["stderr"]),
            None if status is None else int(status),
            None if exit_signal is None else str(exit_signal),
        )


class InstanceLink(Protocol):
    """What an :class:`InstanceHandle` drives: one leased machine. Remote paths are absolute
    (the handle joins them to ``workspace``); each call ends within ``timeout`` or raises
    :class:`InstanceError`."""

    id: str
    label: str
    workspace: str

    def exec(self, command: str, stdin: bytes | None, timeout: float) -> Completed:
        """Run a shell command line in the workspace (in the container, if any)."""

    def push(self, local: Path, remote: str, timeout: float) -> None:
        """Copy a local file or folder to ``remote``."""

    def pull(self, remote: str, local_dir: Path, timeout: float, max_bytes: int) -> str:
        """Copy ``remote`` into ``local_dir``; what it was: ``file``, ``dir`` or ``missing``.
        More than ``max_bytes`` raises :class:`InstanceError`."""

    def release(self) -> None:
        """Delete the machine (errors are the fleet's to report)."""


class InstanceHandle:
    """One leased instance: run commands, copy files both ways, call Python there.

    Relative remote paths are relative to the synced workspace (the project as on this
    machine). ``timeout``: the default limit of each call, ``--gpu-timeout``.
    """

    def __init__(
        self, link: InstanceLink, timeout: float, rootdir: Path, allow: Iterable[str] = ()
    ) -> None:
        self._link = link
        self._rootdir = rootdir
        self._allow = allowed_names(allow)
        self.timeout = timeout

    @property
    def id(self) -> str:
        return self._link.id

    @property
    def gpu(self) -> str:
        return self._link.label

    @property
    def workspace(self) -> str:
        """The synced workspace's absolute path on the instance."""
        return self._link.workspace

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run a shell command line in the workspace; a non-zero exit is no error here."""
        done = self._link.exec(command, None, self._limit(timeout))
        if done.exit_status is not None:
            code = done.exit_status
        else:
            code = -_signal_number(done.exit_signal)
        return CommandResult(_text(done.stdout), _text(done.stderr), code)

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy a local file to the file ``remote``, or a local folder's files into the
        folder ``remote``."""
        self._link.push(Path(local), self._path(remote), self.timeout)

    def get(
        self, remote: str, local: str | os.PathLike[str], *, max_bytes: int = GET_MAX_BYTES
    ) -> None:
        """Copy the file ``remote`` to the local file ``local``, or the folder ``remote``'s
        files into the local folder ``local``. Only plain files come, and only inside
        ``local``: never through a link, at most ``max_bytes`` (else InstanceError)."""
        target = Path(local)
        if target.is_symlink():
            raise InstanceError(f"gpu.get() writes no file through a link, and {target} is one")
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gpucloud-get-") as tmp:
            # The checking reader unpacks into a fresh folder; only plain files come.
            kind = self._link.pull(self._path(remote), Path(tmp), self.timeout, max_bytes)
            if kind == "missing":
                raise FileNotFoundError(f"{remote}: no such file or folder on instance {self.id}")
            if kind == "file":
                os.replace(next(Path(tmp).iterdir()), target)  # replaces a link, never follows
                return
            _move_inside(Path(tmp), target)

    def call(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        allow: Iterable[type | str] = (),
        trusted: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)`` run on the instance; its value, or its exception raised
        again here with the remote traceback in its message.

        The value is unpickled through an allow-list (builtin values, numpy arrays):
        ``allow`` adds classes (a test's own dataclasses) or ``"module.Name"`` strings;
        ``trusted=True`` lets the instance's pickle run any code on this machine."""
        payload = _dumps((fn, args, kwargs), fn, self._rootdir)
        done = self._link.exec(f"python3 -c {shlex.quote(_LOADER)}", payload, self.timeout)
        if done.exit_status == NO_CLOUDPICKLE:
            raise InstanceError(
                f"instance {self.id}: python3 there has no cloudpickle, which call() needs; "
                "add it to the image or install it with --gpu-setup"
            )
        if done.exit_status != 0 or not done.stdout:
            tail = visible(_text(done.stderr)).strip().splitlines()[-8:]
            raise InstanceError(
                f"instance {self.id}: call() of {_name(fn)} ended with {_exit_text(done)}"
                + ("; its last output:\n" + "\n".join(tail) if tail else "")
            )
        allowed = self._allow | allowed_names(allow)
        answer = safe_loads(done.stdout, self.id, allow=allowed, trusted=trusted)
        if answer[0] == "ok":
            return answer[1]
        _, pickled, text = answer
        try:
            exc = (
                None
                if pickled is None
                else safe_loads(pickled, self.id, allow=allowed, trusted=trusted)
            )
        except DisallowedGlobal as refused:
            text += f"\n(the exception itself stays there: {refused})"
            exc = None
        raise _reraised(exc, text, self.id)

    def _path(self, remote: str) -> str:
        return posixpath.join(self.workspace, remote)

    def _limit(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


@dataclass(frozen=True)
class Lease:
    """A machine leased whole, and what a handle on it needs to know."""

    machine: Machine
    timeout: float  # a step's limit unless the call gives one (--gpu-timeout)
    rootdir: Path  # where relative local paths start
    unpickle_allow: tuple[str, ...] = ()  # what call() values may name (--gpu-unpickle-allow)


class Lessor(Protocol):
    """Who leases machines whole: the fleet, and its front desk."""

    async def lease(self, request: GpuRequest) -> Lease:
        """A machine for ``request``, brought up without a worker; InstanceError past the
        bring-up's limits."""

    async def release_lease(self, machine: Machine) -> None:
        """Delete a machine of :meth:`lease`."""


class MachineLink:
    """A leased machine of this process's fleet, driven through its engine."""

    def __init__(self, engine: Engine, lessor: Lessor, machine: Machine) -> None:
        self._engine = engine
        self._lessor = lessor
        self._machine = machine
        self.id = machine.id
        self.label = machine.label
        self.workspace = machine.remote_root

    def exec(self, command: str, stdin: bytes | None, timeout: float) -> Completed:
        return self._engine.run(within(run_on(self._machine, command, stdin), timeout, self.id))

    def push(self, local: Path, remote: str, timeout: float) -> None:
        self._engine.run(within(push_to(self._machine, local, remote), timeout, self.id))

    def pull(self, remote: str, local_dir: Path, timeout: float, max_bytes: int) -> str:
        return self._engine.run(
            within(pull_from(self._machine, remote, local_dir, max_bytes), timeout, self.id)
        )

    def release(self) -> None:
        with contextlib.suppress(TimeoutError, GpuCloudError):
            self._engine.run(self._lessor.release_lease(self._machine), timeout=RELEASE_TIMEOUT_S)


async def run_on(
    machine: Machine, command: str, stdin: bytes | None, max_bytes: int = RUN_OUTPUT_MAX
) -> Completed:
    """Run ``command`` on ``machine`` in its workspace, inside its container if any; more
    than ``max_bytes`` of output on a stream raises InstanceError."""
    line = f"cd {shlex.quote(machine.remote_root)} && {command}"
    if machine.runtime is not None:
        line = machine.runtime.wrap(line)
    try:
        done = await run_capped(machine_shell(machine), line, stdin=stdin, max_bytes=max_bytes)
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"instance {machine.id}: {exc}") from None
    if done.cut:
        raise InstanceError(
            f"instance {machine.id}: {command[:60]!r} printed more than {max_bytes} bytes on "
            "stdout or stderr; write big output to a file and gpu.get() it"
        )
    return Completed(done.stdout, done.stderr, done.exit_status, done.exit_signal)


async def push_to(machine: Machine, local: Path, remote: str) -> None:
    await push(machine_shell(machine), local, remote)


async def pull_from(machine: Machine, remote: str, local_dir: Path, max_bytes: int) -> str:
    """Copy ``remote`` into ``local_dir``; what it was (``file``, ``dir``, ``missing``).
    InstanceError where it holds more than ``max_bytes``, or names a path it may not."""
    pulled = await pull(machine_shell(machine), remote, local_dir, max_bytes=max_bytes)
    if pulled.left:
        size = sum(size for _, size in pulled.left) + pulled.bytes
        raise InstanceError(
            f"instance {machine.id}: {remote} holds {size} bytes, more than the {max_bytes} "
            "gpu.get() takes; pass max_bytes= to take more"
        )
    if pulled.refused:
        name, why = pulled.refused[0]
        raise InstanceError(
            f"instance {machine.id} sent {visible(name)!r}, which was not written: {visible(why)}"
        )
    return pulled.kind


async def within(step: Awaitable[T], timeout: float, instance_id: str) -> T:
    """``step``'s result, or InstanceError once ``timeout`` has passed."""
    try:
        return await asyncio.wait_for(step, timeout)
    except asyncio.TimeoutError:
        raise InstanceError(
            f"instance {instance_id}: no answer within {timeout:g} s (pass timeout= or raise "
            "--gpu-timeout)"
        ) from None


@contextlib.contextmanager
def leased(
    link: InstanceLink, timeout: float, rootdir: Path, allow: Iterable[str] = ()
) -> Iterator[InstanceHandle]:
    """A handle on ``link`` while the ``with`` block runs; the machine is released after."""
    try:
        yield InstanceHandle(link, timeout, rootdir, allow)
    finally:
        link.release()


def lease(
    engine: Engine, lessor: Lessor, request: GpuRequest
) -> contextlib.AbstractContextManager[InstanceHandle]:
    """An instance of this process's fleet for ``request`` while the ``with`` block runs;
    deleted after it."""
    lease = engine.run(lessor.lease(request))
    link = MachineLink(engine, lessor, lease.machine)
    return leased(link, lease.timeout, lease.rootdir, lease.unpickle_allow)


def machine_shell(machine: Machine) -> Shell:
    """Where the machine's commands start; InstanceError if it has no SSH connection."""
    if machine.shell is None:
        raise InstanceError(f"instance {machine.id} has no SSH connection")
    return machine.shell


def machine_conn(machine: Machine) -> asyncssh.SSHClientConnection:
    """The machine's SSH connection; InstanceError if it has none."""
    if machine.conn is None:
        raise InstanceError(f"instance {machine.id} has no SSH connection")
    return machine.conn


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


def _move_inside(source: Path, target: Path) -> None:
    """Move the files under ``source`` to the same paths under ``target``, through real
    folders only: a link (or a file) where a folder should be is refused, never followed,
    and a link where a file goes is replaced."""
    _real_folder(target)
    for path in sorted(source.rglob("*")):
        if path.is_file():
            folder = target
            for part in path.relative_to(source).parts[:-1]:
                folder = _real_folder(folder / part)
            os.replace(path, folder / path.name)


def _real_folder(folder: Path) -> Path:
    with contextlib.suppress(FileExistsError):
        folder.mkdir()
    if not stat.S_ISDIR(os.lstat(folder).st_mode):
        raise InstanceError(f"gpu.get() writes nothing through a link, and {folder} is one")
    return folder


def _reraised(exc: BaseException | None, remote_traceback: str, instance_id: str) -> BaseException:
    remote_traceback = visible(remote_traceback)
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


def _text(data: bytes) -> str:
    return data.decode(errors="replace")


def _exit_text(done: Completed) -> str:
    if done.exit_signal is not None:
        return f"signal {done.exit_signal}"
    return f"exit status {done.exit_status}"


def _signal_number(name: str | None) -> int:
    """The number of signal ``name`` (``KILL`` or ``SIGKILL``); 1 if unknown."""
    try:
        return int(signal.Signals["SIG" + (name or "").removeprefix("SIG")])
    except KeyError:
        return 1
