"""A pool of warm VMs for one VM spec (image + cores + memory + network).

The pool keeps ``min_idle`` VMs ready (initializeVM and waitVM done), up to
``max_size`` in all. Everything is event-driven: taking a VM, returning one,
a creation finishing or failing, a resize, a job starting to wait — each
calls :meth:`Pool._refill`, which starts exactly the creations or destroys
that bring the pool back to its target. There is no polling loop; the only
timer is the backoff after failed creations, where time itself is the point.

A VM in doubt is never handed out again: one-shot VMs (the default) are
destroyed after their job and replaced in the background; with
``reuse=True`` a VM goes back only when the job said it is healthy.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from .config import pool_problems
from .errors import InitializeVMError, PoolClosedError, VMMSError, VMTimeoutError
from .models import TangoMachine, pool_name
from .vmms import VMMS

log = logging.getLogger("vmpool.pool")


@dataclass(frozen=True)
class PoolSpec:
    """What makes VMs interchangeable: one pool per distinct spec."""

    image: str
    vmms: str
    cores: int | None = None
    memory: int | None = None
    network: str | None = None

    @property
    def name(self) -> str:
        """Tango's pool name: the image without its extension."""
        return pool_name(self.image)

    @property
    def key(self) -> str:
        """A unique, readable key: the name, plus whatever else sets it apart."""
        extra = [
            f"{k}={v}"
            for k, v in (("cores", self.cores), ("memory", self.memory), ("network", self.network))
            if v is not None
        ]
        return f"{self.name}[{','.join(extra)}]" if extra else self.name

    def machine(self, vm_id: int) -> TangoMachine:
        return TangoMachine(
            name=self.name,
            image=self.image,
            vmms=self.vmms,
            network=self.network,
            cores=self.cores,
            memory=self.memory,
            id=vm_id,
        )

    @classmethod
    def from_machine(cls, vm: TangoMachine, default_vmms: str) -> PoolSpec:
        if not vm.image:
            raise ValueError("the job's VM names no image")
        return cls(
            image=vm.image,
            vmms=vm.vmms or default_vmms,
            cores=vm.cores,
            memory=vm.memory,
            network=vm.network,
        )


class VMState(enum.Enum):
    CREATING = "creating"
    FREE = "free"
    BUSY = "busy"
    DESTROYING = "destroying"
    #: destroy failed every time; kept in the inventory so it is not forgotten
    LEAKED = "leaked"


@dataclass(eq=False, slots=True)
class _VMRecord:
    vm: TangoMachine
    state: VMState
    created_at: float = 0.0
    #: monotonic time the VM last became available to a job
    ready_at: float = 0.0
    uses: int = 0
    scope: anyio.CancelScope | None = None
    #: creation cancelled by the pool (shrink or close), not by a deadline
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A VM handed to one job. Give it back with :meth:`Pool.release`."""

    vm: TangoMachine
    #: monotonic time the VM became free (for dispatch-overhead accounting)
    ready_at: float


@dataclass
class PoolStatus:
    name: str
    key: str
    min_idle: int
    max_size: int
    reuse: bool
    total: int
    free: int
    busy: int
    creating: int
    destroying: int
    waiting: int
    #: creations that failed, ever
    failed: int
    consecutive_failures: int
    backoff_remaining: float
    last_error: str | None
    leaked: list[int] = field(default_factory=list)
    free_ids: list[int] = field(default_factory=list)
    busy_ids: list[int] = field(default_factory=list)
    creating_ids: list[int] = field(default_factory=list)
    closed: bool = False

    @property
    def total_ids(self) -> list[int]:
        return sorted(self.free_ids + self.busy_ids + self.creating_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "min_idle": self.min_idle,
            "max_size": self.max_size,
            "reuse": self.reuse,
            "total": self.total,
            "free": self.free,
            "busy": self.busy,
            "creating": self.creating,
            "destroying": self.destroying,
            "waiting": self.waiting,
            "failed": self.failed,
            "consecutive_failures": self.consecutive_failures,
            "backoff_remaining": round(self.backoff_remaining, 3),
            "last_error": self.last_error,
            "leaked": self.leaked,
            "free_ids": self.free_ids,
            "busy_ids": self.busy_ids,
            "creating_ids": self.creating_ids,
            "closed": self.closed,
        }


def _counter() -> Callable[[], int]:
    n = 0

    def nxt() -> int:
        nonlocal n
        n += 1
        return n

    return nxt


class Pool:
    """Warm VMs of one spec.

    Use it as ``async with Pool(...) as pool`` (it owns its own task group),
    or pass ``task_group=`` to run its background work in a group the caller
    owns; either way :meth:`close` destroys every VM and awaits every task.
    """

    def __init__(
        self,
        spec: PoolSpec,
        driver: VMMS,
        *,
        min_idle: int = 2,
        max_size: int | None = None,
        reuse: bool = False,
        create_concurrency: int = 4,
        initializevm_timeout: float = 180.0,
        waitvm_timeout: float = 60.0,
        destroy_timeout: float = 30.0,
        destroy_attempts: int = 3,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        next_vm_id: Callable[[], int] | None = None,
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        if max_size is None:
            max_size = max(min_idle, 1)
        problems = pool_problems(
            min_idle=min_idle, max_size=max_size, create_concurrency=create_concurrency,
            initializevm_timeout=initializevm_timeout, waitvm_timeout=waitvm_timeout,
            destroy_timeout=destroy_timeout, backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )
        if destroy_attempts < 1:
            problems.append(f"destroy_attempts must be >= 1, got {destroy_attempts!r}")
        if problems:
            raise ValueError(f"pool {spec.key}: " + "; ".join(problems))

        self.spec = spec
        self.driver = driver
        self.min_idle = min_idle
        self.max_size = max_size
        self.reuse = reuse
        self.create_concurrency = create_concurrency
        self.initializevm_timeout = initializevm_timeout
        self.waitvm_timeout = waitvm_timeout
        self.destroy_timeout = destroy_timeout
        self.destroy_attempts = destroy_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._next_vm_id = next_vm_id or _counter()

        self._vms: dict[int, _VMRecord] = {}
        self._free: deque[_VMRecord] = deque()
        self._n_creating = 0
        self._n_busy = 0
        self._n_destroying = 0
        # Waiters are futures in FIFO order; a cancelled one stays in the deque
        # (skipped when reached) so that cancelling many is not quadratic.
        self._waiters: deque[asyncio.Future[_VMRecord]] = deque()
        self._n_waiting = 0

        self._failed_total = 0
        self._consecutive_failures = 0
        self._backoff_until = 0.0
        self._last_error: str | None = None
        self._wake_scope: anyio.CancelScope | None = None

        self._creators = _Workers(self, self._create, create_concurrency)
        self._destroyers = _Workers(self, self._destroy, max(4, 2 * create_concurrency))

        self._tg = task_group
        self._own_tg: anyio.abc.TaskGroup | None = None
        self._n_tasks = 0
        self._change_events: list[anyio.Event] = []
        self._closing = False
        self._closed = False

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> Pool:
        if self._tg is None:
            self._own_tg = anyio.create_task_group()
            self._tg = await self._own_tg.__aenter__()
        self._refill()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self.close()
        finally:
            if self._own_tg is not None:
                tg, self._own_tg = self._own_tg, None
                await tg.__aexit__(None, None, None)

    def start(self) -> None:
        """Begin filling the pool (when it runs in a caller's task group)."""
        if self._tg is None:
            raise RuntimeError(f"pool {self.spec.key}: no task group; use 'async with pool'")
        self._refill()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------ job side

    async def acquire(self, *, front: bool = False) -> Lease:
        """Wait for a warm VM and take it.

        Jobs get VMs in FIFO order; ``front=True`` (a retried job) goes to the
        head of the line. If a creation fails while jobs wait, the first
        waiting job receives the error (as in Tango, where a job's own VM
        creation failing fails that attempt), so a broken pool fails its jobs
        instead of holding them forever.
        """
        if self._closing:
            raise PoolClosedError(f"pool {self.spec.key} is closed")
        if self._free and self._n_waiting == 0:
            rec = self._free.popleft()
            self._mark_busy(rec)
            self._refill()
            return Lease(rec.vm, rec.ready_at)
        fut: asyncio.Future[_VMRecord] = asyncio.get_running_loop().create_future()
        if front:
            self._waiters.appendleft(fut)
        else:
            self._waiters.append(fut)
        self._n_waiting += 1
        self._refill()
        try:
            rec = await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # A VM was handed over as we were cancelled: it is unused and
                # healthy, so it goes to the next waiter.
                rec = fut.result()
                self._n_busy -= 1
                if self._closing:
                    self._start_destroy(rec, "pool closing")
                else:
                    self._make_available(rec)
                self._refill()
            elif not fut.done() or fut.cancelled():
                # Our own cancellation (the future is cancelled with the task):
                # leave the line. Futures given an exception were counted out
                # by whoever gave it.
                fut.cancel()
                if not self._closing:
                    self._n_waiting -= 1
                self._refill()
            raise
        return Lease(rec.vm, rec.ready_at)

    def release(self, lease: Lease | TangoMachine, *, healthy: bool) -> None:
        """Give a VM back after a job.

        ``healthy`` means every step of the job succeeded and the autodriver
        exited normally. Only a healthy VM of a ``reuse`` pool that is not over
        its size goes back; anything else is destroyed in the background and
        replaced. Returns at once.
        """
        vm = lease.vm if isinstance(lease, Lease) else lease
        rec = self._vms.get(vm.id) if vm.id is not None else None
        if rec is None or rec.state is not VMState.BUSY:
            log.warning("pool %s: release of unknown or idle VM %s ignored", self.spec.key, vm.id)
            return
        rec.uses += 1
        self._n_busy -= 1
        keep = (
            healthy
            and self.reuse
            and not self._closing
            and self._n_active() + 1 <= self.max_size
            and (self._n_waiting > 0 or len(self._free) < self.min_idle)
        )
        if keep:
            self._make_available(rec)
        else:
            self._start_destroy(rec, "one-shot" if healthy else "in doubt after its job")
        self._refill()

    # ------------------------------------------------------------- control

    def resize(self, size: int, *, max_size: int | None = None) -> None:
        """Set the pool's size (Tango's prealloc: SET, not add). Returns at once.

        ``size`` warm VMs are kept; the cap on VMs becomes ``max_size`` (by
        default ``size``, at least 1 so that queued jobs can still run on a
        VM made for them). Extra idle VMs are destroyed now, extra busy ones
        when their job ends.
        """
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"pool {self.spec.key}: size must be an int >= 0, got {size!r}")
        cap = max(size, 1) if max_size is None else max_size
        if not isinstance(cap, int) or cap < size:
            raise ValueError(
                f"pool {self.spec.key}: max_size must be an int >= size ({size}), got {cap!r}"
            )
        if self._closing:
            raise PoolClosedError(f"pool {self.spec.key} is closed")
        self.min_idle = size
        self.max_size = cap
        log.info("pool %s resized: min_idle=%d max_size=%d", self.spec.key, size, cap)
        self._refill()

    async def drain(self) -> None:
        """Keep no warm VMs and wait until every VM is gone.

        Busy VMs are destroyed as their jobs end; the pool stays open (later
        jobs get VMs created on demand, or call :meth:`resize`).
        """
        if not self._closing:
            self.min_idle = 0
            reuse, self.reuse = self.reuse, False
            try:
                self._refill()
                while self._free:
                    self._start_destroy(self._free.popleft(), "drain")
                await self._wait_until(self._quiet)
            finally:
                self.reuse = reuse

    async def close(self, *, busy_grace: float = 10.0) -> None:
        """Destroy every VM, fail waiting jobs, await every background task.

        Busy VMs are destroyed when their job releases them (close the
        scheduler, which cancels its jobs, before its pools); one still held
        ``busy_grace`` seconds later is destroyed under its holder.
        """
        if not self._closing:
            self._closing = True
            for fut in self._waiters:
                if not fut.done():
                    fut.set_exception(PoolClosedError(f"pool {self.spec.key} is closed"))
            self._waiters.clear()
            self._n_waiting = 0
            if self._wake_scope is not None:
                self._wake_scope.cancel()
            for rec in list(self._vms.values()):
                self._cancel_creation(rec)
            while self._free:
                self._start_destroy(self._free.popleft(), "pool closing")
        with anyio.move_on_after(busy_grace):
            await self._wait_until(lambda: self._n_busy == 0)
        for rec in list(self._vms.values()):
            if rec.state is VMState.BUSY:
                log.warning("pool %s: VM %s still held at close; destroying it", self.spec.key,
                            rec.vm.id)
                self._n_busy -= 1
                self._start_destroy(rec, "held past close")
        # Work the workers may not live to do (their task group cancelled):
        # creations never started need nothing; queued destroys run here.
        self._creators.drop_queued(lambda rec: self._vms.pop(rec.vm.id or 0, None))
        while (queued := self._destroyers.take()) is not None:
            with anyio.CancelScope(shield=True):
                await self._destroy(queued)
        await self._wait_until(self._quiet)
        self._creators.stop()
        self._destroyers.stop()
        await self._wait_until(lambda: self._n_tasks == 0)
        # Anything whose destroy failed every time gets one last safe destroy.
        for rec in list(self._vms.values()):
            if rec.state is VMState.LEAKED:
                with anyio.move_on_after(self.destroy_timeout):
                    try:
                        await self.driver.safeDestroyVM(rec.vm)
                        self._vms.pop(rec.vm.id or 0, None)
                    except Exception as e:
                        log.error("pool %s: VM %s could not be destroyed: %s", self.spec.key,
                                  rec.vm.id, e)
        self._closed = True

    def status(self) -> PoolStatus:
        by_state: dict[VMState, list[int]] = {s: [] for s in VMState}
        for vm_id, rec in self._vms.items():
            by_state[rec.state].append(vm_id)
        return PoolStatus(
            name=self.spec.name,
            key=self.spec.key,
            min_idle=self.min_idle,
            max_size=self.max_size,
            reuse=self.reuse,
            total=self._n_active(),
            free=len(self._free),
            busy=self._n_busy,
            creating=self._n_creating,
            destroying=self._n_destroying,
            waiting=self._n_waiting,
            failed=self._failed_total,
            consecutive_failures=self._consecutive_failures,
            backoff_remaining=max(0.0, self._backoff_until - time.monotonic()),
            last_error=self._last_error,
            leaked=sorted(by_state[VMState.LEAKED]),
            free_ids=sorted(by_state[VMState.FREE]),
            busy_ids=sorted(by_state[VMState.BUSY]),
            creating_ids=sorted(by_state[VMState.CREATING]),
            closed=self._closing,
        )

    def inventory(self) -> list[TangoMachine]:
        """Every VM the pool knows of, whatever its state (for leak checks)."""
        return [rec.vm for rec in self._vms.values()]

    # ------------------------------------------------------------ internals

    def _n_active(self) -> int:
        return len(self._free) + self._n_busy + self._n_creating

    def _quiet(self) -> bool:
        """No VM left (but leaked ones) and no creation or destroy in flight."""
        return (
            not self._live_records()
            and self._creators.idle()
            and self._destroyers.idle()
            and self._wake_scope is None
        )

    def _live_records(self) -> bool:
        return any(rec.state is not VMState.LEAKED for rec in self._vms.values())

    def _mark_busy(self, rec: _VMRecord) -> None:
        rec.state = VMState.BUSY
        self._n_busy += 1

    def _make_available(self, rec: _VMRecord) -> None:
        rec.ready_at = time.monotonic()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._n_waiting -= 1
                self._mark_busy(rec)
                fut.set_result(rec)
                return
        rec.state = VMState.FREE
        self._free.append(rec)

    def _changed(self) -> None:
        events, self._change_events = self._change_events, []
        for ev in events:
            ev.set()

    async def wait_until(self, cond: Callable[[PoolStatus], bool]) -> PoolStatus:
        """Wait (no polling) until ``cond(status)`` holds; returns that status.

        Bound it with a cancel scope: ``with anyio.fail_after(5): ...``.
        """
        while True:
            st = self.status()
            if cond(st):
                return st
            await self._wait_change()

    async def _wait_change(self) -> None:
        ev = anyio.Event()
        self._change_events.append(ev)
        await ev.wait()

    async def _wait_until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await self._wait_change()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._tg is not None
        self._n_tasks += 1
        self._tg.start_soon(self._guard, fn, *args)

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        # Background work must never take the owner's task group down.
        try:
            await fn(*args)
        except Exception:
            log.exception("pool %s: background task %s failed", self.spec.key, fn.__name__)
        finally:
            self._n_tasks -= 1
            self._changed()

    def _refill(self) -> None:
        """Start whatever creations or destroys bring the pool to its target.

        Called after every change of state; it also wakes whoever waits in
        :meth:`wait_until`.
        """
        try:
            self._rebalance()
        finally:
            self._changed()

    def _rebalance(self) -> None:
        if self._tg is None or self._closing:
            return
        # Shrink: idle VMs over the cap or over the warm target go first,
        # then creations in flight over the cap.
        excess = self._n_active() - self.max_size
        while self._free and (excess > 0 or len(self._free) > self.min_idle):
            self._start_destroy(self._free.pop(), "pool shrunk")
            excess -= 1
        if excess > 0:
            for rec in list(self._vms.values()):
                if excess <= 0:
                    break
                if self._cancel_creation(rec):
                    excess -= 1
        # Grow: enough VMs for the warm target plus every waiting job. A VM
        # being destroyed still holds its place until it is gone: max_size
        # caps the VMs alive, however slow destruction is.
        want = self.min_idle + self._n_waiting - len(self._free) - self._n_creating
        room = self.max_size - self._n_active() - self._n_destroying
        slots = self.create_concurrency - self._n_creating
        n = min(want, room, slots)
        if n <= 0:
            return
        now = time.monotonic()
        if now < self._backoff_until:
            if self._wake_scope is None:
                self._wake_scope = anyio.CancelScope()
                self._spawn(self._wake_after_backoff, self._wake_scope)
            return
        for _ in range(n):
            vm_id = self._next_vm_id()
            rec = _VMRecord(self.spec.machine(vm_id), VMState.CREATING, created_at=now)
            rec.scope = anyio.CancelScope()
            self._vms[vm_id] = rec
            self._n_creating += 1
            self._creators.put(rec)

    def _cancel_creation(self, rec: _VMRecord) -> bool:
        """Cancel a creation in flight; it stops counting as a VM at once."""
        if rec.state is not VMState.CREATING or rec.scope is None or rec.cancelled:
            return False
        rec.cancelled = True
        rec.scope.cancel()
        self._n_creating -= 1
        return True

    async def _wake_after_backoff(self, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await anyio.sleep(max(0.0, self._backoff_until - time.monotonic()))
        finally:
            self._wake_scope = None
        self._refill()

    async def _create(self, rec: _VMRecord) -> None:
        vm = rec.vm
        if rec.cancelled:
            # cancelled before it started: nothing exists to destroy
            self._vms.pop(vm.id or 0, None)
            self._refill()
            return
        error: BaseException | None = None
        scope = rec.scope
        assert scope is not None
        # One cancel scope: the pool cancels it (shrink, close) and its
        # deadline moves from step to step.
        step, limit = "initializeVM", self.initializevm_timeout
        try:
            with scope:
                try:
                    scope.deadline = anyio.current_time() + limit
                    await self.driver.initializeVM(vm)
                    step, limit = "waitVM", self.waitvm_timeout
                    scope.deadline = anyio.current_time() + limit
                    await self.driver.waitVM(vm, limit)
                except Exception as e:
                    error = e
        except BaseException:
            # Cancelled from outside (the owner's task group is going away):
            # the workers may be gone too, so the VM is destroyed here.
            if not rec.cancelled:
                rec.cancelled = True
                self._n_creating -= 1
            rec.state = VMState.DESTROYING
            self._n_destroying += 1
            with anyio.CancelScope(shield=True):
                await self._destroy(rec)
            raise
        cancelled = rec.cancelled
        if scope.cancelled_caught and not cancelled and error is None:
            error = VMTimeoutError(step, limit)
        if not cancelled:
            self._n_creating -= 1
        if error is None and not cancelled and not self._closing:
            self._consecutive_failures = 0
            self._make_available(rec)
            log.debug("pool %s: VM %s ready", self.spec.key, vm.id)
            self._refill()
            return
        if error is not None and not cancelled:
            self._creation_failed(vm, error)
        self._start_destroy(rec, "creation failed" if error else "creation cancelled")
        self._refill()

    def _creation_failed(self, vm: TangoMachine, error: BaseException) -> None:
        self._failed_total += 1
        self._consecutive_failures += 1
        delay = min(
            self.backoff_max,
            self.backoff_initial * math.pow(2, min(self._consecutive_failures - 1, 30)),
        )
        self._backoff_until = time.monotonic() + delay
        detail = f"{type(error).__name__}: {error}"
        self._last_error = detail
        log.warning(
            "pool %s: creating VM %s failed (%s); next try in %.2f s",
            self.spec.key, vm.id, detail, delay,
        )
        # The job at the head of the line takes the failure for this attempt.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._n_waiting -= 1
                if isinstance(error, VMMSError):
                    exc: VMMSError = error
                else:
                    exc = InitializeVMError(f"creating VM failed: {detail}")
                fut.set_exception(exc)
                break

    def _start_destroy(self, rec: _VMRecord, why: str) -> None:
        if rec.state is VMState.DESTROYING:
            return
        rec.state = VMState.DESTROYING
        self._n_destroying += 1
        log.debug("pool %s: destroying VM %s (%s)", self.spec.key, rec.vm.id, why)
        self._destroyers.put(rec)

    async def _destroy(self, rec: _VMRecord) -> None:
        """Destroy a VM: shielded from cancellation, each attempt bounded."""
        gone = False
        for attempt in range(self.destroy_attempts):
            problem = ""
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + self.destroy_timeout
                try:
                    await self.driver.destroyVM(rec.vm)
                    gone = True
                except Exception as e:
                    problem = str(e) or type(e).__name__
            if gone:
                break
            if scope.cancelled_caught:
                problem = f"timed out after {self.destroy_timeout:g} s"
            log.warning(
                "pool %s: destroying VM %s failed (attempt %d/%d): %s",
                self.spec.key, rec.vm.id, attempt + 1, self.destroy_attempts, problem,
            )
            if attempt + 1 < self.destroy_attempts:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(min(self.backoff_max, 0.05 * 2**attempt))
        self._n_destroying -= 1
        if gone:
            self._vms.pop(rec.vm.id or 0, None)
        else:
            rec.state = VMState.LEAKED
            log.error("pool %s: VM %s could not be destroyed; kept as leaked", self.spec.key,
                      rec.vm.id)
        self._refill()  # its place is free: a waiting job may get a VM now


class _Workers:
    """Up to ``limit`` long-lived tasks working through a queue.

    A parked worker is woken for new work; spawning a task per item would
    cost more than a fast driver's whole call. Workers run in the pool's
    task group and exit on :meth:`stop`.
    """

    def __init__(
        self, pool: Pool, work: Callable[[_VMRecord], Awaitable[None]], limit: int
    ) -> None:
        self._pool = pool
        self._work = work
        self._limit = limit
        self._queue: deque[_VMRecord] = deque()
        self._parked: deque[asyncio.Future[None]] = deque()
        self._n = 0
        self._busy = 0
        self._stopping = False

    def put(self, rec: _VMRecord) -> None:
        self._queue.append(rec)
        while self._parked:
            fut = self._parked.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        if self._n < self._limit:
            self._n += 1
            self._pool._spawn(self._run)

    def idle(self) -> bool:
        return not self._queue and self._busy == 0

    def take(self) -> _VMRecord | None:
        """Take a queued item to do it oneself (None when there is none)."""
        return self._queue.popleft() if self._queue else None

    def drop_queued(self, drop: Callable[[_VMRecord], object]) -> None:
        while self._queue:
            drop(self._queue.popleft())

    def stop(self) -> None:
        self._stopping = True
        while self._parked:
            fut = self._parked.popleft()
            if not fut.done():
                fut.set_result(None)

    async def _run(self) -> None:
        try:
            while True:
                while self._queue:
                    rec = self._queue.popleft()
                    self._busy += 1
                    try:
                        await self._work(rec)
                    finally:
                        self._busy -= 1
                        self._pool._changed()
                if self._stopping:
                    return
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._parked.append(fut)
                await fut
        finally:
            self._n -= 1
