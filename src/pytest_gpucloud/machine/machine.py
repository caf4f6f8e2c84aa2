"""One instance and the remote pytest session on it: bring-up and release.

A :class:`Machine` moves through :class:`MachineState`::

    requested -> booting -> connecting -> ready <-> busy
    any of these -> releasing (or failed: it could not be brought up or kept) -> released

The state lives here only: the fleet marks a machine ``releasing`` when it decides to let
it go, however far its bring-up got.

Bring-up is a pipeline of steps (create with failover, boot, SSH, code sync, the image
and its container, the setup command, the GPU health check, worker; see
:mod:`~pytest_gpucloud.machine.preparation`); each step raises a
:class:`~pytest_gpucloud.core.errors.GpuCloudError` naming the instance and cause. Without a
setup command, the steps after the sync start as soon as the workspace folder exists, and
only the worker's collection waits for the last file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_gpucloud import remote
from pytest_gpucloud.core.errors import GpuCloudError, InstanceError, OutOfCapacity, ProviderError
from pytest_gpucloud.core.gpus import PROBE
from pytest_gpucloud.machine import preparation, workspaces
from pytest_gpucloud.machine.deletion import delete_verified
from pytest_gpucloud.machine.failover import offer_name
from pytest_gpucloud.machine.runtime import Runtime, runtime_for
from pytest_gpucloud.providers.base import HasShell, LeasingProvider
from pytest_gpucloud.transport import ssh
from pytest_gpucloud.transport.commands import ExecShell, Shell
from pytest_gpucloud.transport.sync import sync
from pytest_gpucloud.transport.worker_link import (
    REMOTE_PACKAGE,
    Collection,
    WorkerLink,
    WorkerStart,
)

if TYPE_CHECKING:
    import asyncssh

    from pytest_gpucloud.config.settings import Settings
    from pytest_gpucloud.core.catalog import Offer
    from pytest_gpucloud.core.request import GpuRequest
    from pytest_gpucloud.machine.failover import Failover
    from pytest_gpucloud.providers.base import Instance, Provider

# How long a worker may take to end its session at release: deletes go out soon after.
WORKER_CLOSE_S = 1.0
# With --cov it also stops measuring and sends its data, which the report needs.
WORKER_CLOSE_COVERAGE_S = 30.0
CREATE_SETTLE_S = 30.0


class MachineState(str, enum.Enum):
    """Where a machine is in its life (see the module docstring for the moves)."""

    REQUESTED = "requested"
    BOOTING = "booting"
    CONNECTING = "connecting"
    READY = "ready"
    BUSY = "busy"
    RELEASING = "releasing"
    RELEASED = "released"
    FAILED = "failed"


@dataclass
class Phases:
    """Seconds each step of a machine's bring-up took, and its first test (``--gpu-report``:
    ``instances[].phases``). ``boot``: from the create's answer to running and reachable;
    ``ready``: from there to ready for tests, wall clock. Without a setup command,
    ``prepare`` and ``worker_start`` run during the ``sync``, so the steps add up to more
    than ``ready``. ``ready_to_first_result``: ``ready`` plus ``first_test``."""

    boot: float | None = None
    connect: float | None = None
    sync: float | None = None
    prepare: float | None = None  # container, setup command, GPU check
    worker_start: float | None = None  # the worker's exec to pytest imported
    collect: float | None = None  # the worker let go (sync done) to collected
    first_test: float | None = None  # the first run frame to the test's last report
    ready: float | None = None

    def to_json(self) -> dict[str, float | None]:
        phases: dict[str, float | None] = dict(vars(self))
        if self.ready is not None and self.first_test is not None:
            phases["ready_to_first_result"] = self.ready + self.first_test
        else:
            phases["ready_to_first_result"] = None
        return {k: None if v is None else round(v, 4) for k, v in phases.items()}


@dataclass(eq=False)
class Machine:
    """One instance and the remote pytest session on it."""

    pool: GpuRequest
    offer: Offer
    count: int
    state: MachineState = MachineState.REQUESTED
    instance: Instance | None = None
    requested_at: float = field(default_factory=time.time)
    created_at: float | None = None
    ready_at: float | None = None
    deleted_at: float | None = None
    tests_run: int = 0
    # Leased whole (gpu_cloud.instance(), gpu_service): no worker, no tests.
    leased: bool = False
    error: str | None = None
    conn: asyncssh.SSHClientConnection | None = None
    # Where its commands start: over conn, an exec each, or the lease's hub.
    shell: Shell | None = None
    link: WorkerLink | None = None
    remote_root: str = ""
    collection: Collection | None = None
    # The worker's start frame, files included: a restarted worker gets the same.
    worker_start: WorkerStart | None = None
    released: asyncio.Future[bool] | None = None
    runtime: Runtime | None = None
    # What bring-up did, for its "ready" status line: image pull time, setup, GPUs seen.
    notes: list[str] = field(default_factory=list)
    # The offers tried before this one that had no capacity, for its "booting" line.
    passed_over: list[str] = field(default_factory=list)
    phases: Phases = field(default_factory=Phases)
    coverage: str | None = None  # its worker's coverage data, once released (--cov)

    @property
    def id(self) -> str:
        return self.instance.id if self.instance else "(not created)"

    @property
    def label(self) -> str:
        """How test lines and status lines name this machine: ``A100-80GB i-3f2a``."""
        count = f":{self.count}" if self.count > 1 else ""
        return f"{self.offer.gpu.name}{count} {self.id}"

    @property
    def seconds(self) -> float:
        """Billed seconds: from the provider's create time to the delete request."""
        if self.created_at is None:
            return 0.0
        return max(0.0, (self.deleted_at or time.time()) - self.created_at)

    @property
    def price_per_hour(self) -> float:
        return self.instance.price_per_hour if self.instance else self.offer.price(self.count)


@dataclass(frozen=True)
class Launcher:
    """What bringing a machine up needs: the provider, the session's SSH key, the settings,
    the files to mirror and the worker's start frame."""

    provider: Provider
    settings: Settings
    rootdir: Path
    labels: dict[str, str]
    start: WorkerStart
    # More files of the worker's package folder (coverage's, with --cov): path there -> here.
    packages: dict[str, Path] = field(default_factory=dict)
    key: asyncssh.SSHKey = field(default_factory=ssh.new_client_key)
    # Every create call sent, so the teardown can wait for those in flight.
    creates: list[asyncio.Future[Instance]] = field(default_factory=list)
    # Set when the session was interrupted: releases stop workers without goodbyes.
    hurry: threading.Event = field(default_factory=threading.Event)

    async def create(self, machine: Machine, offers: list[Offer], failover: Failover) -> None:
        """Create ``machine``'s instance from the first of ``offers`` with capacity, in order.

        An offer out of capacity is avoided for the rest of the session (``failover``) and
        the next one is tried; every call counts against ``--gpu-max-creates``. Raises a
        ProviderError naming every offer tried when none has capacity.
        """
        request = machine.pool
        tried: list[str] = []
        for offer in offers:
            if offer.key in failover.avoided:
                continue
            failover.spend_create(request.spec, tried)
            machine.offer = offer
            create = asyncio.ensure_future(
                self.provider.create(
                    offer,
                    count=machine.count,
                    image=request.image or self.settings.image,
                    ssh_public_key=ssh.public_key_line(self.key),
                    labels=self.labels,
                    max_lifetime_s=self.settings.lifetime_s,
                    client_token=uuid.uuid4().hex,
                )
            )
            self.creates.append(create)
            try:
                # Shielded: a cancelled session still learns whether the create made one.
                instance = await asyncio.shield(create)
            except OutOfCapacity:
                failover.avoid(offer)
                tried.append(offer_name(offer))
                continue
            machine.instance = instance
            machine.created_at = instance.created_at
            machine.passed_over = tried
            return
        raise failover.exhausted(request.spec, offers, tried)

    async def settle_creates(self) -> bool:
        """Wait (a bounded while) for creates still in flight; False if none was ever sent."""
        pending = [create for create in self.creates if not create.done()]
        if pending:
            await asyncio.wait(pending, timeout=CREATE_SETTLE_S)
        return bool(self.creates)

    async def bring_up(self, machine: Machine, files: list[str] | None) -> None:
        """Boot, connect, sync the code and start the worker, which collects ``files``
        (None: no worker, for a machine leased whole by ``gpu_cloud.instance()``)."""
        assert machine.instance is not None
        boot_timeout = self.settings.boot_timeout
        deadline = time.monotonic() + boot_timeout
        phases, lap = machine.phases, _Lap()
        machine.state = MachineState.BOOTING
        machine.instance = await self.provider.wait_ready(machine.instance, boot_timeout)
        phases.boot = lap()
        reachable = time.perf_counter()
        machine.state = MachineState.CONNECTING
        connect_timeout = max(1.0, deadline - time.monotonic())
        if isinstance(self.provider, LeasingProvider):
            machine.conn = await self.provider.connect(machine.instance, self.key, connect_timeout)
        else:
            machine.conn = await ssh.connect(machine.instance, self.key, timeout=connect_timeout)
            if machine.instance.ssh_host_key is None:  # tofu: pin what the first one saw
                seen = ssh.presented_host_key(machine.conn)
                machine.instance = dataclasses.replace(machine.instance, ssh_host_key=seen)
        if isinstance(self.provider, HasShell):
            machine.shell = self.provider.shell(machine.instance)
        else:
            machine.shell = ExecShell(machine.conn)
        phases.connect = lap()
        try:
            await self._sync_and_start(machine, files, deadline)
        except InstanceError:
            # An image's python3 too old for the instance side fails in many ways: say so.
            older = await preparation.older_python(machine.shell, machine.runtime, machine.id)
            if older is None:
                raise
            raise older from None
        phases.ready = time.perf_counter() - reachable
        machine.ready_at = time.time()
        machine.state = MachineState.READY

    async def _sync_and_start(
        self, machine: Machine, files: list[str] | None, deadline: float
    ) -> None:
        """Sync the code, prepare the instance, start the worker and let it collect."""
        # With no setup command to run between them, the container, the GPU check and the
        # worker's start (its pytest import) go on while the code is still syncing.
        early = self.settings.setup is None
        root_known: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        syncing = asyncio.ensure_future(self._sync(machine, root_known))
        try:
            if early:
                first: set[asyncio.Future[Any]] = {root_known, syncing}
                await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
                if not root_known.done():
                    await syncing  # failed before the folder was made: raises why
                machine.remote_root = root_known.result()
                await self._prepare_and_launch(machine, files, deadline)
            await syncing
            if not early:
                await self._prepare_and_launch(machine, files, deadline)
        finally:
            if not syncing.done():
                syncing.cancel()
                await asyncio.wait({syncing})
        if machine.link is not None:
            assert machine.worker_start is not None
            machine.collection = await machine.link.begin(
                machine.worker_start, timeout=_left(deadline)
            )
            machine.phases.collect = machine.collection.collect_s

    async def _sync(self, machine: Machine, root_known: asyncio.Future[str]) -> None:
        assert machine.shell is not None
        result = await sync(
            machine.shell,
            self.rootdir,
            workspaces.remote_dir(self.rootdir, warm=isinstance(self.provider, LeasingProvider)),
            extra={**_remote_package_files(), **self.packages},
            root_known=root_known,
        )
        machine.remote_root = result.remote_root
        machine.phases.sync = result.seconds

    async def _prepare_and_launch(
        self, machine: Machine, files: list[str] | None, deadline: float
    ) -> None:
        """Prepare the instance, then launch the worker (unless ``files`` is None)."""
        started = time.perf_counter()
        # With a worker to start, the GPU check runs in its exec: one login shell less.
        await self._prepare(machine, check=files is None)
        machine.phases.prepare = time.perf_counter() - started
        if files is not None:
            machine.worker_start = {**self.start, "args": [*self.start["args"], *files]}
            machine.link = await self._launch_worker(machine, timeout=_left(deadline), probe=True)
            machine.phases.worker_start = machine.link.start_s
            machine.notes.append(
                preparation.judge_folded(
                    machine.link.probe,
                    machine.id,
                    gpu=machine.offer.gpu.name,
                    count=machine.count,
                )
            )

    async def _prepare(self, machine: Machine, *, check: bool) -> None:
        """The steps before the worker: the image and its container, the setup command and,
        with ``check``, the GPU health check (a mismatch raises GpuMismatch)."""
        assert machine.shell is not None
        settings = self.settings
        runtime = machine.runtime = runtime_for(
            settings.runtime,
            image=machine.pool.image or settings.image,
            workspace=machine.remote_root,
            container="gpucloud-" + re.sub(r"[^A-Za-z0-9_.-]", "-", machine.id),
        )
        container_id, machine.notes = await preparation.start_container(
            machine.shell,
            runtime,
            machine.id,
            pull_timeout=settings.boot_timeout,
            leftover=isinstance(self.provider, LeasingProvider),
        )
        if settings.setup is not None:
            note = await preparation.run_setup(
                machine.shell,
                runtime,
                machine.id,
                command=settings.setup,
                key=preparation.setup_key(
                    settings.setup, self.rootdir, runtime=runtime, container_id=container_id
                ),
                log=self.rootdir / ".gpucloud" / "logs" / f"{machine.id}-setup.log",
                timeout=settings.timeout,
            )
            machine.notes.append(note)
        if check:
            machine.notes.append(
                await preparation.check_gpus(
                    machine.shell,
                    runtime,
                    machine.id,
                    gpu=machine.offer.gpu.name,
                    count=machine.count,
                )
            )

    async def _launch_worker(
        self, machine: Machine, timeout: float, *, probe: bool = False
    ) -> WorkerLink:
        assert machine.shell is not None
        return await WorkerLink.launch(
            machine.shell,
            machine.id,
            workspace=machine.remote_root,
            package_dir=f"{machine.remote_root}/.gpucloud/pkg",
            timeout=timeout,
            wrap=machine.runtime.wrap if machine.runtime else None,
            probe=PROBE if probe else None,
            echo=_echo if self.start["live_output"] else None,
        )

    async def recover(self, machine: Machine) -> bool:
        """After a test lost its worker: start a fresh worker on the same instance if the
        instance still runs and its SSH connection holds. False: give the machine up."""
        if machine.link is not None:
            machine.link.kill()
        if machine.conn is None or machine.conn.is_closed():
            return False
        try:
            if (await self.provider.get(machine.id)).status != "running":
                return False
            timeout = self.settings.boot_timeout
            assert machine.worker_start is not None
            machine.link = await self._launch_worker(machine, timeout)
            machine.collection = await machine.link.begin(machine.worker_start, timeout)
        except GpuCloudError as exc:
            machine.error = f"{machine.error}; restarting its worker failed: {exc}"
            return False
        return True

    async def release(self, machine: Machine, *, failed: bool = False, busy: bool = False) -> bool:
        """Stop the worker, close SSH, delete the instance and verify it is gone. ``busy``:
        a test was running on it (also when its state says so).

        Returns False when the instance may still be alive (an orphan). Idempotent: later
        calls wait for the first, which goes on even if its caller is cancelled.
        """
        if machine.released is None:
            machine.released = asyncio.ensure_future(self._release(machine, failed, busy))
        return await asyncio.shield(machine.released)

    async def _release(self, machine: Machine, failed: bool, busy: bool) -> bool:
        # A machine still busy had its test cut short: no goodbyes; nor in a hurry.
        busy = busy or machine.state is MachineState.BUSY
        machine.state = MachineState.FAILED if failed else MachineState.RELEASING
        if machine.link is not None:
            if busy or self.hurry.is_set():
                machine.link.kill()
            else:
                measured = self.start["coverage"] is not None
                await machine.link.close(WORKER_CLOSE_COVERAGE_S if measured else WORKER_CLOSE_S)
                machine.coverage = machine.link.coverage
        if machine.conn is not None:
            await self._clean(machine, machine.conn)
            machine.conn.close()
        if machine.instance is not None:
            machine.deleted_at = time.time()
            try:
                await delete_verified(self.provider, machine.id)
            except ProviderError as exc:
                machine.error = f"delete failed: {exc}"
                return False
        machine.state = MachineState.RELEASED
        return True

    async def _clean(self, machine: Machine, conn: asyncssh.SSHClientConnection) -> None:
        """Remove the container before the instance goes; on a machine that outlives the
        session (a lease), the workspace stays, warm for the next session."""
        if machine.runtime is None or machine.shell is None or conn.is_closed():
            return
        failed = await preparation.clean(machine.shell, machine.runtime, machine.id)
        if failed and machine.error is None:
            machine.error = "; ".join(failed)


class _Lap:
    """Seconds since the last call (or since made)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def __call__(self) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds


def _left(deadline: float) -> float:
    """Seconds a worker step may take: what is left of the bring-up's, at least 30 s."""
    return max(30.0, deadline - time.monotonic())


def _remote_package_files() -> dict[str, Path]:
    source = Path(remote.__file__).parent
    return {
        f".gpucloud/pkg/{REMOTE_PACKAGE}/{path.name}": path for path in sorted(source.glob("*.py"))
    }


def _echo(output: bytes) -> None:
    """A remote test's own output, shown as it comes (``-s``)."""
    sys.stdout.write(output.decode(errors="replace"))
    sys.stdout.flush()
