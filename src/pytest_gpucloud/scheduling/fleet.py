"""The fleet: every instance of a session, leased to the tests that fit it.

The fleet lives in the controlling process only. :meth:`Fleet.plan` takes the session's
items when collection ends, makes the :class:`~pytest_gpucloud.scheduling.planner.Plan` and
starts the instances it needs (``--gpu-start``: all now, each about when its first test is
due, or at first use). :meth:`Fleet.run` runs one test; it may be awaited concurrently, once
per owner (an xdist worker; a constant without xdist). A test takes, in this order:

1. an idle machine that can host it: the one its owner's last test named it as next on
   (same remote session: fixtures stay up), then one its owner used last, then one of its
   own pool, then one of another pool where sharing is not dearer
   (:meth:`~pytest_gpucloud.scheduling.cost.CostModel.share_ok`), cheapest first;
2. a machine still starting that can host it and that no other owner waits for;
3. a new machine, if ``--gpu-max-instances``, ``--gpu-max-creates`` and ``--gpu-budget``
   allow; at the instance limit an idle machine that cannot host it is released first;
4. else it waits for one of these, or ends as an error that says why none can come.

The decisions are :mod:`~pytest_gpucloud.scheduling.policy`'s; the fleet gathers the facts
and applies them. Every test is checked against the budget before it runs. A
machine is released as soon as no queued test could use it (early release: no idle
seconds billed for nothing), and every machine at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pytest_gpucloud.core.catalog import GpuType, check_known, explain_infeasible, feasible_offers
from pytest_gpucloud.core.errors import (
    PREFIX,
    BudgetError,
    GpuCloudError,
    GpuMismatch,
    InstanceError,
    OutOfCapacity,
    ProviderError,
    RemoteError,
    TimeLimitExceeded,
)
from pytest_gpucloud.core.labels import SESSION, session_labels
from pytest_gpucloud.core.units import format_dollars
from pytest_gpucloud.features.data import DataSource
from pytest_gpucloud.features.instance_handle import Lease
from pytest_gpucloud.machine.deletion import sweep
from pytest_gpucloud.machine.failover import Failover
from pytest_gpucloud.machine.machine import Launcher, Machine, MachineState
from pytest_gpucloud.scheduling import cost, policy
from pytest_gpucloud.scheduling.cost import CostModel, Placement
from pytest_gpucloud.scheduling.durations import Durations
from pytest_gpucloud.scheduling.planner import Plan, Services, make_plan
from pytest_gpucloud.scheduling.progress import Progress
from pytest_gpucloud.scheduling.read_ahead import ReadAhead, allowed_env, unset_env

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from pathlib import Path

    from pytest_gpucloud.config.settings import Settings
    from pytest_gpucloud.core.catalog import Offer
    from pytest_gpucloud.core.request import GpuRequest, Tests
    from pytest_gpucloud.features.artifacts import ArtifactStore
    from pytest_gpucloud.providers.base import Provider
    from pytest_gpucloud.remote.protocol import Message
    from pytest_gpucloud.transport.worker_link import TestRun, WorkerStart

# gpu_cloud.instance(): on top of boot and --gpu-setup limits, for the rest of bring-up.
LEASE_MARGIN_S = 120.0
_UP = (MachineState.READY, MachineState.BUSY)
_GONE = (MachineState.RELEASING, MachineState.RELEASED, MachineState.FAILED)


@dataclass(eq=False)
class _Use:
    """The fleet's bookkeeping of one machine."""

    claimed_by: str | None = None  # the owner waiting for it or running a test on it
    last_owner: str | None = None
    promise: str | None = None  # the nextid its last test was run with
    test: str | None = None  # the test running on it now
    test_started: float = 0.0  # monotonic
    test_started_at: float = 0.0  # epoch
    asked_by: str | None = None  # the test its creation was for
    failure: GpuCloudError | None = None  # why it could not be brought up
    replaces: GpuMismatch | None = None  # it replaces an instance that showed other GPUs
    abandoned: bool = False  # release it as soon as its create answers
    said_busy: bool = False
    said_released: bool = False
    task: asyncio.Task[None] | None = None


class Fleet:
    """Provisions, leases, runs tests on and deletes instances of one provider."""

    def __init__(
        self,
        provider: Provider,
        settings: Settings,
        *,
        rootdir: Path,
        start: WorkerStart,
        project: str,
        durations: Durations | None = None,
        workers: int = 1,
        artifacts: ArtifactStore | None = None,
        data: DataSource | None = None,
        packages: dict[str, Path] | None = None,
    ) -> None:
        self.provider = provider
        self.settings = settings
        # Each test's gpu_artifacts brought home (None: left on the instances), and the
        # presigning of its datasets.
        self.artifacts = artifacts
        self.data = data or DataSource(settings.s3_endpoint, settings.boot_timeout)
        self.session_id = settings.session_id or uuid.uuid4().hex[:12]
        self.machines: list[Machine] = []
        self.orphans: list[str] = []
        # What the summary should say about the teardown, beside each machine's error.
        self.notes: list[str] = []
        self.durations = durations or Durations()
        self.costs = CostModel(self.durations)
        self.workers = max(1, workers)
        self.progress = Progress()
        self.failover = Failover(settings.max_creates)
        self.planned: Plan | None = None
        self.placements: dict[str, Placement] = {}
        self.launcher = Launcher(
            provider,
            settings,
            rootdir,
            session_labels(self.session_id, project, settings.lifetime_s),
            start,
            packages or {},
        )
        self.read_ahead = ReadAhead(settings.timeout, settings.env)
        self._catalog: list[GpuType] | None = None
        self._feasible: dict[GpuRequest, list[Offer]] = {}
        self._pool_errors: dict[GpuRequest, str] = {}
        self._replacements: dict[GpuRequest, int] = {}
        # pool -> nodeid -> request: the planned tests that have not started
        self._queued: dict[GpuRequest, dict[str, GpuRequest]] = {}
        self._seen: set[str] = set()
        self._unset_noted: set[str] = set()  # allow-listed variables not set here, named once
        self._uses: dict[Machine, _Use] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warming: list[asyncio.Task[None]] = []
        self._change = asyncio.Event()
        self._closing = False

    async def catalog(self) -> list[GpuType]:
        if self._catalog is None:
            self._catalog = await self.provider.catalog()
        return self._catalog

    @property
    def catalog_read(self) -> list[GpuType]:
        """The catalog as the plan saw it (empty before it was read)."""
        return self._catalog or []

    async def plan(self, tests: Tests, services: Services = ()) -> Plan:
        """Take the session's items in run order (request None: a local test), and the
        ``gpu_service`` servers declared in its code (see :func:`planner.make_plan`).

        The first call makes the plan and, unless ``--gpu-plan``, starts the instances it
        needs; later calls (from other xdist workers) only queue tests not seen yet.
        """
        catalog = await self.catalog()
        for nodeid, request in tests:
            if request is not None and nodeid not in self._seen:
                self._seen.add(nodeid)
                self._queued.setdefault(request.pool_key, {})[nodeid] = request
                self._note_unset_env(request)
        if self.planned is None:
            self.planned = make_plan(
                tests,
                services=services,
                offers=self._new_offers,
                explain=lambda pool: explain_infeasible(pool, catalog, self.settings.regions),
                costs=self.costs,
                workers=self.workers,
                max_instances=self.settings.max_instances,
            )
            if not self.settings.plan:
                self._warm_start(self.planned)
        return self.planned

    def _note_unset_env(self, request: GpuRequest) -> None:
        """Once per name: an allow-listed variable that is not set here reaches no test."""
        for name in unset_env((*self.settings.env, *request.env)):
            if name not in self._unset_noted:
                self._unset_noted.add(name)
                self.progress.emit(
                    name,
                    "is not set here",
                    "(named by --gpu-env or gpu(env=...)): remote tests see it unset",
                )

    async def run(
        self, nodeid: str, request: GpuRequest, nextid: str | None, *, owner: str
    ) -> tuple[TestRun, Machine]:
        """Run one test on a machine that can host ``request``; infrastructure trouble raises.

        ``owner``: the process whose item this is (an xdist worker id); may be awaited
        concurrently for several owners, one test each. ``nextid``: the owner's next test
        of the same pool, if known (the remote session keeps the fixtures it shares).
        """
        try:
            limit = request.timeout_s or self.settings.timeout
            data = await self.data.presign(nodeid, request.data, limit) if request.data else {}
        except GpuCloudError:
            self.forget([(nodeid, request)])
            raise
        machine = await self._lease(nodeid, request, owner)
        use = self._uses[machine]
        assert machine.link is not None
        timeout = request.timeout_s or self.settings.timeout
        env = allowed_env((*self.settings.env, *request.env))
        ahead = self.read_ahead.runs_from(nextid)
        preempted = False
        try:
            run = await machine.link.run(nodeid, nextid, timeout, env, ahead, data)
            await self._bring_home(machine, nodeid, run.artifacts)
        except RemoteError as exc:
            machine.error = str(exc)
            if isinstance(exc, TimeLimitExceeded):
                exc.remote_root = machine.remote_root
            await self._bring_home(machine, nodeid, None, lost=True)
            await self._recover(machine, request)
            # A spot instance that is gone was preempted: the test runs again elsewhere.
            preempted = machine.offer.spot and machine.state is not MachineState.READY
            if not preempted:
                raise
        except asyncio.CancelledError:  # its owner is gone: the remote test may still run
            self._retire(machine)
            raise
        finally:
            seconds = time.monotonic() - use.test_started
            self.placements[nodeid] = Placement(machine.id, use.test_started_at, seconds)
            use.test = use.claimed_by = None
            use.last_owner = owner
            machine.tests_run += 1  # timed out or lost, it ran there all the same
            self._after_change()
        if preempted:
            if self.settings.spot_fallback:
                request = replace(request, spot=False)
            self.progress.emit(machine.label, "preempted", f"{nodeid} runs again")
            return await self.run(nodeid, request, nextid, owner=owner)
        if machine.tests_run == 1:
            machine.phases.first_test = run.seconds
        self.read_ahead.done(nodeid)
        machine.state = MachineState.READY
        use.promise = nextid
        self.data.note(run.data)
        self._after_change()
        return run, machine

    def expect(self, order: dict[str, tuple[GpuRequest, str | None]]) -> None:
        """The order in which this process will ask for tests: nodeid -> (its request, the
        test after it on its machine). Quick tests are then read ahead."""
        self.read_ahead.expect(order)

    def hurry(self) -> None:
        """The session was interrupted: releases stop workers without goodbyes."""
        self.launcher.hurry.set()

    def give_up(self) -> None:
        """The teardown ran out of time: every machine not released counts as an orphan."""
        self.orphans.extend(m.id for m in self.machines if m.state is not MachineState.RELEASED)

    async def _bring_home(
        self, machine: Machine, nodeid: str, frame: Message | None, *, lost: bool = False
    ) -> None:
        """The test's gpu_artifacts, while its machine is sure to be up (``lost``: its
        worker died; look for them anyway)."""
        if self.artifacts is not None:
            await self.artifacts.collect(machine, nodeid, frame, lost=lost)

    async def lease(self, request: GpuRequest) -> Lease:
        """A machine of its own for ``request`` (``gpu_cloud.instance()``), with what a
        handle on it needs: brought up like any but without a worker, never given a test,
        billed, reported and torn down with the others; InstanceError past the bring-up's
        limits (boot, --gpu-setup, the rest). :meth:`release_lease` deletes it."""
        limit = self.settings.boot_timeout + self.settings.timeout + LEASE_MARGIN_S
        try:
            machine = await asyncio.wait_for(self._lease_whole(request), limit)
        except asyncio.TimeoutError:
            raise InstanceError(f"no instance for {request.spec} within {limit:g} s") from None
        return Lease(
            machine, self.settings.timeout, self.launcher.rootdir, self.settings.unpickle_allow
        )

    async def _lease_whole(self, request: GpuRequest) -> Machine:
        """The machine of :meth:`lease`, without its time limit."""
        pool = request.pool_key
        check_known(pool, await self.catalog())
        offers = self._new_offers(pool)
        if not offers:
            raise self._no_offer(pool)
        what = f"gpu_cloud.instance({pool.spec!r}) on a new {offers[0].gpu.name}"
        self._check_budget(self.costs.new(offers[0], pool.count, what), what)
        machine = self._launch(pool, owner=f"lease-{uuid.uuid4().hex[:8]}", asked_by=None)
        use = self._uses[machine]
        machine.leased = True
        try:
            while machine.state is not MachineState.READY:
                if use.failure is not None:
                    raise use.failure
                if machine.state in _GONE:
                    raise InstanceError(machine.error or f"{machine.label} was released")
                await self._next_change()
        except BaseException:
            self._retire(machine)  # nobody will use it
            raise
        machine.state = MachineState.BUSY
        return machine

    async def release_lease(self, machine: Machine) -> None:
        """Delete a machine of :meth:`lease`."""
        await self._release(machine)

    def forget(self, nodeids: Tests | None = None) -> None:
        """These queued tests will not run (None: none of them will): machines only they
        needed are released now."""
        if nodeids is None:
            self._queued.clear()
        else:
            for nodeid, request in nodeids:
                if request is not None:
                    self._queued.get(request.pool_key, {}).pop(nodeid, None)
        self._after_change()

    async def shutdown(self) -> list[Machine]:
        """Release every machine at once, then delete the instances of this session that
        no machine holds (a create whose answer was lost or unreadable); idempotent."""
        self._closing = True
        self._queued.clear()
        for task in self._warming:
            task.cancel()
        for machine in self.machines:
            if machine.state not in _UP:
                self._retire(machine)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await asyncio.gather(*(self._release(m) for m in self.machines))
        await self._sweep()
        return self.machines

    # -- leasing ----------------------------------------------------------------------------

    async def _lease(self, nodeid: str, request: GpuRequest, owner: str) -> Machine:
        # A waiting test stays queued: the machines it could use are kept, and the worker
        # of one started meanwhile collects its file.
        try:
            while True:
                machine = self._pick(nodeid, request, owner)
                if machine is not None:
                    return machine
                await self._next_change()
        except BaseException:
            self._dequeue(nodeid, request)
            self._drop_claims(owner)
            self._after_change()
            raise

    def _dequeue(self, nodeid: str, request: GpuRequest) -> None:
        self._queued.get(request.pool_key, {}).pop(nodeid, None)

    def _drop_claims(self, owner: str) -> None:
        """Let others have the machines ``owner`` waited for."""
        for use in self._uses.values():
            if use.claimed_by == owner and use.test is None:
                use.claimed_by = None

    def _pick(self, nodeid: str, request: GpuRequest, owner: str) -> Machine | None:
        """The machine to run ``nodeid`` on now, or None to wait (claiming or creating one
        for the owner on the way); raises when none can come."""
        idle = self._idle_hosts(nodeid, request, owner)
        if idle:
            return self._take(idle[0], nodeid, request, owner)
        for use in self._uses.values():
            if use.claimed_by == owner and use.test is None:
                if use.failure is not None:
                    use.claimed_by = None
                    raise use.failure
                return None  # still starting
        starting = [
            self._seat(m)
            for m, use in self._uses.items()
            if m.state not in _UP + _GONE
            and use.claimed_by is None
            and self._can_host(m, request, nodeid)
        ]
        chosen = policy.pick_starting(starting, request.pool_key)
        if chosen is not None:
            self._uses[chosen].claimed_by = owner
        else:
            self._create_for(nodeid, request, owner)
        return None

    def _idle_hosts(self, nodeid: str, request: GpuRequest, owner: str) -> list[Machine]:
        idle = [
            self._seat(m)
            for m, use in self._uses.items()
            if m.state is MachineState.READY
            and use.claimed_by in (None, owner)
            and self._can_host(m, request, nodeid)
        ]
        return policy.rank_idle(idle, nodeid, request.pool_key, owner)

    def _seat(self, machine: Machine) -> policy.Seat[Machine]:
        use = self._uses[machine]
        return policy.Seat(
            machine,
            machine.pool,
            machine.price_per_hour,
            claimed_by=use.claimed_by,
            last_owner=use.last_owner,
            promise=use.promise,
            requested_at=machine.requested_at,
        )

    def _take(self, machine: Machine, nodeid: str, request: GpuRequest, owner: str) -> Machine:
        use = self._uses[machine]
        self._check_budget(
            self.costs.on_running(machine.price_per_hour, nodeid),
            f"{nodeid} on {machine.label}",
        )
        self._drop_claims(owner)
        self._dequeue(nodeid, request)
        machine.state = MachineState.BUSY
        use.claimed_by = owner
        use.test = nodeid
        use.test_started = time.monotonic()
        use.test_started_at = time.time()
        if not use.said_busy:
            use.said_busy = True
            self.progress.emit(machine.label, "busy", f"with {nodeid}")
        self._after_change()
        return machine

    def _create_for(self, nodeid: str, request: GpuRequest, owner: str) -> None:
        """Start a machine for ``nodeid`` if the limits allow; return to wait; raise when
        no machine can come."""
        pool = request.pool_key
        if pool in self._pool_errors:
            raise InstanceError(self._pool_errors[pool])
        lost = self._replacements.get(pool, 0)
        if lost > self.settings.retries:
            raise InstanceError(
                f"gave up on {request.spec}: {lost} of its instances were lost, and "
                f"--gpu-retries allows {self.settings.retries} fresh one(s) (raise it to "
                "try more)"
            )
        offers = self._new_offers(pool)
        # A machine that can host it but is busy, or starting for another owner, will do
        # if no new one can be made.
        others = any(self._can_host(m, request, nodeid) for m in self._uses if m.state not in _GONE)
        if not offers:
            if others:
                return
            raise self._no_offer(pool)
        gpu = offers[0].gpu.name
        what = (
            f"{nodeid} on a new {gpu} (expected boot {self.durations.boot_s(gpu):.0f} s + test "
            f"{self.durations.test_s(nodeid):.0f} s at ${offers[0].price(pool.count):.2f}/h)"
        )
        try:
            self._check_budget(self.costs.new(offers[0], pool.count, nodeid), what)
        except BudgetError:
            if others:
                return
            raise
        if self._alive() < self.settings.max_instances:
            self._launch(pool, owner=owner, asked_by=nodeid)
        elif not others and (victim := self._victim()) is not None:
            self._retire(victim)  # its delete goes out first, then this test's create

    def _victim(self) -> Machine | None:
        """The idle machine to release to make room, least needed first."""
        idle = [
            m
            for m, use in self._uses.items()
            if m.state is MachineState.READY and use.claimed_by is None
        ]
        return policy.victim(idle, self._queued_users)

    # -- provisioning -----------------------------------------------------------------------

    def _warm_start(self, plan: Plan) -> None:
        """eager: every planned machine now; jit: each pool's first one about when its first
        test is due. The rest (with xdist, a pool may have one per worker) start when a
        test asks while the others are busy: xdist does not say which worker gets what."""
        for start in policy.warm_starts(plan.machines, self.settings.start):
            self._warming.append(self._spawn(self._warm(start.pool, start.delay_s, start.nth)))

    async def _warm(self, pool: GpuRequest, delay: float, nth: int) -> None:
        """Start the ``nth`` machine of ``pool`` after ``delay`` unless it is not needed then:
        its tests are gone, it runs already, or a limit is in the way."""
        await asyncio.sleep(delay)
        queued = self._queued.get(pool)
        mine = [m for m in self.machines if m.pool == pool and m.state not in _GONE]
        offers = self._new_offers(pool)
        if (
            self._closing
            or not queued
            or not offers
            or pool in self._pool_errors
            or len(mine) >= nth
            or self._alive() >= self.settings.max_instances
        ):
            return
        try:
            cost = self.costs.new(offers[0], pool.count, next(iter(queued)))
            self._check_budget(cost, f"starting a {offers[0].gpu.name} ahead of its tests")
        except BudgetError:
            return  # its tests say so when they come
        self._launch(pool, owner=None, asked_by=None)

    def _launch(self, pool: GpuRequest, *, owner: str | None, asked_by: str | None) -> Machine:
        offers = self._new_offers(pool)
        machine = Machine(pool=pool, offer=offers[0], count=pool.count)
        self.machines.append(machine)
        use = self._uses[machine] = _Use(claimed_by=owner, asked_by=asked_by)
        count = f":{pool.count}" if pool.count > 1 else ""
        self.progress.emit(f"{offers[0].gpu.name}{count}", "requested", f"for {pool.canonical()}")
        use.task = self._spawn(self._provision(machine, offers))
        return machine

    async def _provision(self, machine: Machine, offers: list[Offer]) -> None:
        use = self._uses[machine]
        try:
            await self.launcher.create(machine, offers, self.failover)
            price = f"${machine.price_per_hour:.2f}/h"
            why = ""
            if machine.passed_over:
                why = f" ({', '.join(machine.passed_over)}: no capacity)"
            self.progress.emit(
                machine.label, "booting", f"in {machine.offer.region} at {price}{why}"
            )
            if use.abandoned or self._closing:
                await self._release(machine)
                return
            files = None if machine.leased else self._files_for(machine, use.asked_by)
            await self.launcher.bring_up(machine, files)
            assert machine.ready_at is not None
            boot = machine.ready_at - machine.requested_at
            self.durations.record_boot(machine.offer.gpu.name, boot)
            # with what bring-up did: image pull time, setup, the GPUs seen
            notes = "".join(f"; {note}" for note in machine.notes)
            self.progress.emit(machine.label, "ready", f"in {boot:.1f} s{notes}")
        except asyncio.CancelledError:
            await asyncio.shield(self._release(machine))
            raise
        except GpuMismatch as exc:
            await self._mismatched(machine, exc)
        except OutOfCapacity as exc:
            await self._no_capacity(machine, exc)
        except Exception as exc:
            failure = exc if isinstance(exc, GpuCloudError) else InstanceError(_described(exc))
            await self._failed(machine, failure)
        finally:
            self._after_change()

    async def _failed(self, machine: Machine, failure: GpuCloudError) -> None:
        """``machine`` could not be brought up: its tests (the pool's) error with why."""
        self._uses[machine].failure = failure
        machine.error = str(failure)
        self._pool_errors.setdefault(machine.pool, str(failure))
        self.progress.emit(machine.label, "failed", str(failure).splitlines()[0])
        await asyncio.shield(self._release(machine, failed=True))

    async def _no_capacity(self, machine: Machine, exc: OutOfCapacity) -> None:
        """No capacity for one more instance: while another machine that can run the pool's
        tests is up or coming (this machine's only GPU, say, with more xdist workers than
        GPUs), they wait for it; else they error with why."""
        use = self._uses[machine]
        others = [
            m
            for m, u in self._uses.items()
            if m is not machine
            and m.state not in _GONE
            and self._can_host(m, machine.pool, use.asked_by or "")
        ]
        if not others:
            await self._failed(machine, exc)
            return
        use.claimed_by = None
        names = ", ".join(m.label for m in others)
        self.progress.emit(
            machine.label, "dropped", f"(no capacity for one more instance); tests wait for {names}"
        )
        await asyncio.shield(self._release(machine, failed=True))

    async def _mismatched(self, machine: Machine, exc: GpuMismatch) -> None:
        """Not the GPUs asked for (the health check): one fresh instance, then give up."""
        use = self._uses[machine]
        machine.error = str(exc)
        self.progress.emit(machine.label, "failed", str(exc).splitlines()[0])
        await asyncio.shield(self._release(machine, failed=True))
        if use.replaces is None and not use.abandoned and not self._closing:
            replacement = self._launch(machine.pool, owner=use.claimed_by, asked_by=use.asked_by)
            self._uses[replacement].replaces = exc
            use.claimed_by = None
            return
        failure = exc
        if use.replaces is not None:
            failure = GpuMismatch(
                f"{use.replaces}; it was released and replaced once, but the replacement "
                f"{str(exc).removeprefix(PREFIX)}"
            )
        use.failure = failure
        self._pool_errors.setdefault(machine.pool, str(failure))

    def _files_for(self, machine: Machine, asked_by: str | None) -> list[str]:
        """The test files its worker collects: those of every queued test it could host."""
        nodeids = [
            nodeid
            for tests in self._queued.values()
            for nodeid, request in tests.items()
            if self._can_host(machine, request, nodeid)
        ]
        if asked_by is not None:
            nodeids.append(asked_by)
        return sorted({nodeid.split("::")[0] for nodeid in nodeids})

    # -- release ----------------------------------------------------------------------------

    def _after_change(self) -> None:
        """Wake the waiting tests, and release the machines no queued test could use."""
        self._release_unneeded()
        self._change.set()
        self._change = asyncio.Event()

    async def _next_change(self) -> None:
        await self._change.wait()

    def _release_unneeded(self) -> None:
        for machine, use in self._uses.items():
            if (
                use.claimed_by is None
                and machine.state not in (MachineState.BUSY, *_GONE)
                and self._queued_users(machine) == 0
            ):
                self._retire(machine)

    def _retire(self, machine: Machine) -> None:
        """Release ``machine`` in the background, however far its bring-up got."""
        if machine.state in _GONE:
            return
        use = self._uses[machine]
        busy = self._releasing(machine)
        if use.task is not None and not use.task.done():
            if machine.instance is None:
                use.abandoned = True  # the create call goes on; its answer is released
            else:
                use.task.cancel()
            return
        self._spawn(self._release(machine, busy=busy))

    @staticmethod
    def _releasing(machine: Machine) -> bool:
        """Mark ``machine`` as on its way out; whether a test was running on it."""
        busy = machine.state is MachineState.BUSY
        if machine.state not in _GONE:
            machine.state = MachineState.RELEASING
        return busy

    async def _release(self, machine: Machine, *, failed: bool = False, busy: bool = False) -> None:
        use = self._uses.get(machine)
        busy = self._releasing(machine) or busy
        if not await self.launcher.release(machine, failed=failed, busy=busy) and (
            machine.id not in self.orphans
        ):
            self.orphans.append(machine.id)
        if use is not None and machine.instance is not None and not use.said_released:
            use.said_released = True
            billed = cost.billed(machine.price_per_hour, machine.seconds)
            # the session's one clock (from the request, as "ready in"), then the bill
            since = (machine.deleted_at or time.time()) - machine.requested_at
            self.progress.emit(
                machine.label,
                "released",
                f"{since:.1f} s after its request; {machine.seconds:.1f} s billed, "
                f"{format_dollars(billed)}",
            )
        self._after_change()

    async def _recover(self, machine: Machine, request: GpuRequest) -> None:
        """After a test lost its worker: keep the machine with a fresh worker if the instance
        is healthy; else give it up, and the pool's next test gets a fresh instance (at most
        ``--gpu-retries`` of them)."""
        if await self.launcher.recover(machine):
            machine.state = MachineState.READY
            return
        pool = request.pool_key
        self._replacements[pool] = self._replacements.get(pool, 0) + 1
        await self._release(machine, failed=True)

    async def _sweep(self) -> None:
        if not await self.launcher.settle_creates():
            return
        held = {m.id for m in self.machines}
        failed, notes = await sweep(self.provider, {SESSION: self.session_id}, held)
        self.orphans += failed
        self.notes += notes

    # -- choices and limits -----------------------------------------------------------------

    def _feasible_offers(self, request: GpuRequest) -> list[Offer]:
        """Every offer that satisfies the request in the allowed regions, best first."""
        pool = request.pool_key
        if pool not in self._feasible:
            catalog = self._catalog or []
            self._feasible[pool] = feasible_offers(pool, catalog, self.settings.regions)
        return self._feasible[pool]

    def _new_offers(self, request: GpuRequest) -> list[Offer]:
        """The offers a new machine for ``request`` may still be created from."""
        return self.failover.usable(self._feasible_offers(request))

    def _no_offer(self, pool: GpuRequest) -> GpuCloudError:
        feasible = self._feasible_offers(pool)
        if feasible:
            return self.failover.exhausted(pool.spec, feasible, [])
        return ProviderError(explain_infeasible(pool, self._catalog or [], self.settings.regions))

    def _can_host(self, machine: Machine, request: GpuRequest, nodeid: str) -> bool:
        """Whether ``nodeid`` may run on ``machine``: its own pool's, or sharing it is not
        dearer than a new machine of its own."""
        pool = request.pool_key
        if machine.pool == pool:  # the common case, without the offers' lookup
            return True
        feasible = self._feasible_offers(pool)
        return policy.may_share(
            machine.pool,
            machine.offer,
            machine.price_per_hour,
            pool,
            nodeid,
            feasible=feasible,
            new_offers=self.failover.usable(feasible),
            costs=self.costs,
        )

    def _queued_users(self, machine: Machine) -> int:
        """How many queued tests could run on ``machine`` (counting stops at the first of
        another pool: enough to know it is needed)."""
        users = len(self._queued.get(machine.pool, {}))
        if users:
            return users
        for pool, tests in self._queued.items():
            if pool != machine.pool and any(
                self._can_host(machine, r, n) for n, r in tests.items()
            ):
                return 1
        return 0

    def _alive(self) -> int:
        """Machines that are or will be instances whose delete has not gone out yet."""
        return sum(
            1
            for m in self.machines
            if m.deleted_at is None and m.state not in (MachineState.RELEASED, MachineState.FAILED)
        )

    def _check_budget(self, extra: float, what: str) -> None:
        """Raise BudgetError if ``extra`` on top of the meter and the work under way would
        pass ``--gpu-budget``."""
        budget = self.settings.budget
        if budget is None:
            return
        spent = cost.spent(self.machines)
        under_way = self._under_way()
        if policy.over_budget(budget, spent, under_way, extra):
            raise BudgetError(
                f"the budget of {format_dollars(budget)} would be passed by {what}: "
                f"{format_dollars(spent)} spent, {format_dollars(under_way)} expected for work "
                f"under way, {format_dollars(extra)} for this; raise --gpu-budget to run it"
            )

    def _under_way(self) -> float:
        """Expected cost still to come of the tests running and the machines starting."""
        now = time.monotonic()
        total = 0.0
        for machine, use in self._uses.items():
            if machine.state in _GONE:
                continue
            if use.test is not None:
                left = self.durations.test_s(use.test) - (now - use.test_started)
            elif machine.state is not MachineState.READY:
                boot = self.durations.boot_s(machine.offer.gpu.name)
                left = boot - (time.time() - machine.requested_at)
            else:
                continue
            total += policy.left_to_pay(machine.price_per_hour, left)
        return total

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
