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

import enum
import functools
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from .config import pool_problems
from .errors import (
    InitializeVMError,
    NoRoomError,
    PoolClosedError,
    VMMSError,
    VMTimeoutError,
)
from .lifetime import Lifetime
from .models import TangoMachine, pool_name
from .stats import now as clock
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

    @functools.cached_property
    def name(self) -> str:
        """Tango's pool name: the image without its extension."""
        return pool_name(self.image)

    @functools.cached_property
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
    #: being destroyed (a cancelled creation too): still holds its slot
    DESTROYING = "destroying"
    #: destroy failed every time; kept in the inventory so it is not forgotten
    LEAKED = "leaked"


@dataclass(eq=False, slots=True)
class _Slot:
    """One unit of the pool's capacity: a VM from the moment its creation
    starts until its destruction has finished."""

    vm: TangoMachine
    state: VMState
    created_at: float = 0.0
    #: monotonic time the VM last became available to a job
    ready_at: float = 0.0
    uses: int = 0
    scope: anyio.CancelScope | None = None
    #: creation cancelled by the pool (shrink or close), not by a deadline
    cancelled: bool = False
    #: the driver said the VM must take no other job (lost or retired)
    retired: bool = False


class _Slots:
    """Every slot of a pool by state; the pool's counts are derived from it.

    :meth:`move` is the only place a slot changes state. Within a state slots
    keep their order (FIFO: the VM free longest is handed out first).
    """

    __slots__ = ("_of", "busy", "creating", "destroying", "free", "leaked")

    def __init__(self) -> None:
        self.creating: OrderedDict[int, _Slot] = OrderedDict()
        self.free: OrderedDict[int, _Slot] = OrderedDict()
        self.busy: OrderedDict[int, _Slot] = OrderedDict()
        self.destroying: OrderedDict[int, _Slot] = OrderedDict()
        self.leaked: OrderedDict[int, _Slot] = OrderedDict()
        self._of: dict[VMState, OrderedDict[int, _Slot]] = {
            VMState.CREATING: self.creating, VMState.FREE: self.free, VMState.BUSY: self.busy,
            VMState.DESTROYING: self.destroying, VMState.LEAKED: self.leaked,
        }

    def add(self, slot: _Slot) -> None:
        self._of[slot.state][_key(slot)] = slot

    def move(self, slot: _Slot, state: VMState) -> None:
        key = _key(slot)
        del self._of[slot.state][key]
        slot.state = state
        self._of[state][key] = slot

    def remove(self, slot: _Slot) -> None:
        self._of[slot.state].pop(_key(slot), None)

    def count(self, state: VMState) -> int:
        return len(self._of[state])

    def of(self, state: VMState) -> list[_Slot]:
        return list(self._of[state].values())

    @staticmethod
    def first(slots: OrderedDict[int, _Slot]) -> _Slot | None:
        """The slot longest in ``slots`` (None when there is none)."""
        return slots[next(iter(slots))] if slots else None

    @staticmethod
    def last(slots: OrderedDict[int, _Slot]) -> _Slot | None:
        """The slot most recently put in ``slots``."""
        return slots[next(reversed(slots))] if slots else None

    def all(self) -> list[_Slot]:
        return [s for slots in self._of.values() for s in slots.values()]

    def live(self) -> int:
        """VMs that are or will be usable: free, busy and being created."""
        return len(self.free) + len(self.busy) + len(self.creating)

    def taken(self) -> int:
        """Slots holding a VM that exists or may exist (all but leaked ones)."""
        return len(self.free) + len(self.busy) + len(self.creating) + len(self.destroying)


def _key(slot: _Slot) -> int:
    return slot.vm.id or 0


class _Waiter:
    """A job waiting for a VM: handed a slot, or an error, then woken."""

    __slots__ = ("error", "event", "key", "slot")

    def __init__(self, key: str | None = None) -> None:
        self.event = anyio.Event()
        self.slot: _Slot | None = None
        self.error: BaseException | None = None
        #: whose job it is (a courselab): the line is fair between keys
        self.key = key


class _Line:
    """The jobs waiting for a VM: FIFO within a key (a courselab), round-robin
    between keys, so one course's deadline flood does not make every other
    course wait behind it. Each key is served ``weights[key]`` times (default
    1) per turn. A retried job goes to the front of its key's line, and its
    key to the front of the turn. Every operation is O(1)."""

    __slots__ = ("_credit", "_keys", "_n", "weights")

    def __init__(self, weights: Mapping[str, int] | None = None) -> None:
        #: key -> its waiters, in FIFO order; the keys in turn order
        self._keys: OrderedDict[str | None, OrderedDict[_Waiter, None]] = OrderedDict()
        #: what is left of the first key's turn
        self._credit = 0
        self._n = 0
        self.weights = dict(weights or {})

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def add(self, waiter: _Waiter, *, front: bool = False) -> None:
        line = self._keys.get(waiter.key)
        if line is None:
            line = self._keys[waiter.key] = OrderedDict()
        line[waiter] = None
        if front:
            line.move_to_end(waiter, last=False)
            if next(iter(self._keys)) != waiter.key:
                self._keys.move_to_end(waiter.key, last=False)
                self._credit = 0
        self._n += 1

    def remove(self, waiter: _Waiter) -> None:
        line = self._keys.get(waiter.key)
        if line is None or waiter not in line:
            return
        del line[waiter]
        self._n -= 1
        if not line:
            first = next(iter(self._keys)) == waiter.key
            del self._keys[waiter.key]
            if first:
                self._credit = 0

    def pop(self) -> _Waiter | None:
        """The next waiter to serve: the first of the key whose turn it is."""
        if not self._keys:
            return None
        key, line = next(iter(self._keys.items()))
        if self._credit <= 0:
            self._credit = max(1, self.weights.get(key or "", 1))
        waiter, _ = line.popitem(last=False)
        self._n -= 1
        self._credit -= 1
        if not line:
            del self._keys[key]
            self._credit = 0
        elif self._credit <= 0:
            self._keys.move_to_end(key)  # its turn is over
        return waiter

    def drain(self) -> list[_Waiter]:
        out = [w for line in self._keys.values() for w in line]
        self._keys.clear()
        self._n = self._credit = 0
        return out


@dataclass(frozen=True)
class Adaptive:
    """Adaptive sizing: the pool's warm target follows the arrival rate.

    The target is ``ceil(rate * create_seconds + margin * sqrt(rate *
    create_seconds) + extra)``, clamped to [``low``, ``high``] (``high``
    also by ``max_size``): the VMs the arrivals of one VM creation time
    take, plus a margin for Poisson bursts (``margin`` standard
    deviations). ``rate`` is an exponentially weighted average of the
    arrivals (half-life ``halflife`` seconds); ``create_seconds`` the
    pool's own average creation time (initializeVM + waitVM), ``create``
    until one is measured. The pool grows to a higher target at once and
    gives up VMs over a lower one only once they have been idle for
    ``hold`` seconds (its hysteresis: a lull does not empty it).
    """

    low: int = 0
    high: int = 1_000_000
    halflife: float = 300.0
    margin: float = 2.0
    extra: float = 0.0
    hold: float = 120.0
    create: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"adaptive: need 0 <= low <= high, got {self.low}, {self.high}")
        if not (self.halflife > 0 and self.margin >= 0 and self.extra >= 0 and self.hold >= 0
                and self.create > 0):
            raise ValueError(f"adaptive: bad parameters {self}")


class _Rate:
    """An exponentially weighted arrival rate (per second) with half-life ``h``."""

    __slots__ = ("_at", "_tau", "_value")

    def __init__(self, halflife: float) -> None:
        self._tau = halflife / math.log(2)
        self._value = 0.0
        self._at: float | None = None

    def arrival(self, t: float) -> None:
        self._value = self.value(t) + 1.0 / self._tau
        self._at = t

    def value(self, t: float) -> float:
        if self._at is None:
            return 0.0
        return self._value * math.exp(-max(0.0, t - self._at) / self._tau)


class _Wake:
    """A rebalance of the pool due at some time (:meth:`Pool._refill_at`)."""

    __slots__ = ("scope",)

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None

    @property
    def pending(self) -> bool:
        return self.scope is not None

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


class Lease:
    """A VM handed to one job, as ``async with pool.lease() as lease``.

    The VM goes back when the block ends, whatever ends it; it is kept for
    another job only if the holder set :attr:`healthy` (every step of the
    job succeeded) and the pool reuses VMs. Anything else destroys it.
    """

    __slots__ = ("_front", "_key", "_pool", "_slot", "healthy")

    def __init__(self, pool: Pool, front: bool, key: str | None = None) -> None:
        self._pool = pool
        self._front = front
        self._key = key
        self._slot: _Slot | None = None
        self.healthy = False

    @property
    def vm(self) -> TangoMachine:
        if self._slot is None:
            raise RuntimeError("the lease holds no VM (not entered, or already given back)")
        return self._slot.vm

    @property
    def ready_at(self) -> float:
        """Monotonic time the VM became free (for dispatch-overhead accounting)."""
        return self._slot.ready_at if self._slot is not None else 0.0

    async def __aenter__(self) -> Lease:
        if self._slot is not None:
            raise RuntimeError("a lease is entered once")
        self._slot = await self._pool._take(front=self._front, key=self._key)
        return self

    async def __aexit__(self, *exc: object) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._pool._give_back(slot, healthy=self.healthy)


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
    idle_timeout: float = 0.0
    #: free VMs the pool keeps now (min_idle, or the adaptive target)
    idle_target: int = 0
    #: the driver's instance-hours of this pool (EC2), if it counts them
    usage: dict[str, float] | None = None

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
            "idle_timeout": self.idle_timeout,
            "idle_target": self.idle_target,
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
            **({"usage": self.usage} if self.usage is not None else {}),
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
    owns and call :meth:`start`; either way :meth:`close` (from any task)
    destroys every VM and awaits every task of the pool.

    Jobs hold VMs as leases: ``async with pool.lease() as lease: ...``.
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
        idle_timeout: float = 0.0,
        next_vm_id: Callable[[], int] | None = None,
        task_group: anyio.abc.TaskGroup | None = None,
        adaptive: Adaptive | None = None,
        weights: Mapping[str, int] | None = None,
        fair: bool = True,
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
        if not idle_timeout >= 0:
            problems.append(f"idle_timeout must be >= 0, got {idle_timeout!r}")
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
        #: free VMs over the warm target (min_idle) are kept this long once
        #: idle, for the next burst (0: destroyed at once)
        self.idle_timeout = idle_timeout
        #: the rebalance when the idle VM idle longest is due to go
        self._idle_wake = _Wake()
        self._next_vm_id = next_vm_id or _counter()

        self._slots = _Slots()
        # Jobs waiting for a VM, in FIFO order (a retried job goes first); a
        # cancelled waiter leaves at once, in O(1).
        self._waiters = _Line(weights)
        #: whether the line is fair between keys (courselabs); False: one FIFO
        self.fair = fair
        #: adaptive sizing (None: the warm target is min_idle)
        self.adaptive = adaptive
        self._rate = _Rate(adaptive.halflife if adaptive else 300.0)
        self._create_avg: float | None = None

        self._failed_total = 0
        self._consecutive_failures = 0
        self._backoff_until = 0.0
        self._last_error: str | None = None
        #: the rebalance when the creation backoff is over
        self._backoff_wake = _Wake()
        #: the last creation failed for want of room in the driver
        self._no_room = False

        self._creators = _Workers(self, self._create, create_concurrency)
        self._destroyers = _Workers(self, self._destroy, max(4, 2 * create_concurrency))

        self._given_tg = task_group
        self._tg: anyio.abc.TaskGroup | None = task_group
        self._life = Lifetime(self.close)
        self._n_tasks = 0
        self._change_events: list[anyio.Event] = []
        self._closing = False
        self._closed = anyio.Event()
        self._unwatch = driver.watch_lost(self._lost)
        self._unwatch_room = driver.watch_room(self._room)

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> Pool:
        self._tg = await self._life.enter(self._given_tg)
        self._refill()
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return await self._life.exit(typ, exc, tb)

    def start(self) -> None:
        """Begin filling the pool (when it runs in a caller's task group)."""
        if self._tg is None:
            raise RuntimeError(f"pool {self.spec.key}: no task group; use 'async with pool'")
        self._refill()

    def request_close(self) -> None:
        """Ask the pool's owner to close it: its ``async with`` block finishes
        (the body is cancelled) and the pool closes. Any task may call it."""
        self._life.request_close()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------ job side

    def new_vm_id(self) -> int:
        """A VM id no other VM of this manager has (for a VM made outside
        the pool, e.g. a job-owned one)."""
        return self._next_vm_id()

    def lease(self, *, front: bool = False, key: str | None = None) -> Lease:
        """Wait for a warm VM and hold it for the ``async with`` block.

        Jobs get VMs in FIFO order within a ``key`` (a courselab), in turn
        between keys (see :class:`_Line`); ``front=True`` (a retried job)
        goes to the head of its key's line. If a creation fails while jobs wait, the first
        waiting job receives the error (as in Tango, where a job's own VM
        creation failing fails that attempt), so a broken pool fails its jobs
        instead of holding them forever. Raises PoolClosedError once closing.
        """
        return Lease(self, front, key)

    async def _take(self, *, front: bool, key: str | None = None) -> _Slot:
        if self._closing:
            raise PoolClosedError(f"pool {self.spec.key} is closed")
        if self.adaptive is not None and not front:  # (a retry is no new arrival)
            self._rate.arrival(clock())
        slot = _Slots.first(self._slots.free)
        if slot is not None and not self._waiters:
            self._slots.move(slot, VMState.BUSY)
            self._refill()
            return slot
        waiter = _Waiter(key if self.fair else None)
        self._waiters.add(waiter, front=front)
        self._refill()
        try:
            await waiter.event.wait()
        except BaseException:
            self._waiters.remove(waiter)
            if waiter.slot is not None:
                # A VM was handed over as we were cancelled: it is unused and
                # healthy, so it goes to the next waiter.
                slot, waiter.slot = waiter.slot, None
                if self._closing:
                    self._start_destroy(slot, "pool closing")
                else:
                    self._make_available(slot)
            self._refill()
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.slot is not None
        return waiter.slot

    def _give_back(self, slot: _Slot, *, healthy: bool) -> None:
        """A VM back after a job: kept only if healthy, reused and wanted;
        anything else is destroyed in the background and replaced."""
        if slot.state is not VMState.BUSY:
            log.warning("pool %s: VM %s given back while %s; ignored", self.spec.key,
                        slot.vm.id, slot.state.value)
            return
        slot.uses += 1
        keep = (
            healthy
            and not slot.retired
            and self.reuse
            and not self._closing
            and self._slots.live() <= self.max_size
            # wanted: a job waits, the warm target is short, or idle VMs
            # over it are kept for a while (idle_timeout)
            and (bool(self._waiters) or len(self._slots.free) < self.idle_target()
                 or self._hold() > 0)
        )
        if keep:
            self._make_available(slot)
        else:
            self._start_destroy(slot, "one-shot" if healthy else "in doubt after its job")
        self._refill()

    def _room(self) -> None:
        """There may be room again: after a NoRoomError, try now, not after
        the backoff."""
        if self._no_room:
            self._no_room = False
            self._backoff_until = 0.0
            self._backoff_wake.cancel()
            self._refill()

    def _lost(self, vms: list[TangoMachine]) -> None:
        """The driver says these VMs must take no other job (their host went
        down, or is drained): idle ones and creations leave the pool now,
        busy ones when their job ends, whatever it says; the pool refills."""
        ids = {vm.id for vm in vms if vm.id is not None}
        for slot in self._slots.of(VMState.FREE):
            if slot.vm.id in ids:
                self._start_destroy(slot, "retired by its driver")
        for slot in self._slots.of(VMState.CREATING):
            if slot.vm.id in ids:
                self._cancel_creation(slot)
        for slot in self._slots.of(VMState.BUSY):
            if slot.vm.id in ids:
                slot.retired = True
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
                for slot in self._slots.of(VMState.FREE):
                    self._start_destroy(slot, "drain")
                await self._wait_until(self._quiet)
            finally:
                self.reuse = reuse

    async def close(self, *, busy_grace: float = 10.0) -> None:
        """Destroy every VM, fail waiting jobs, await every background task.

        Any task may call it (a second call waits for the first). Busy VMs
        are destroyed when their job gives them back (close the scheduler,
        which cancels its jobs, before its pools); one still held
        ``busy_grace`` seconds later is destroyed under its holder.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            await self._close(busy_grace)
        finally:
            self._unwatch()
            self._unwatch_room()
            self._closed.set()
            if not self._life.from_owner():
                self._life.request_close()

    async def _close(self, busy_grace: float) -> None:
        waiters = self._waiters.drain()
        for w in waiters:
            w.error = PoolClosedError(f"pool {self.spec.key} is closed")
            w.event.set()
        self._backoff_wake.cancel()
        self._idle_wake.cancel()
        for slot in self._slots.of(VMState.CREATING):
            self._cancel_creation(slot)
        for slot in self._slots.of(VMState.FREE):
            self._start_destroy(slot, "pool closing")
        self._changed()
        with anyio.move_on_after(busy_grace):
            await self._wait_until(lambda: not self._slots.busy)
        for slot in self._slots.of(VMState.BUSY):
            log.warning("pool %s: VM %s still held at close; destroying it", self.spec.key,
                        slot.vm.id)
            self._start_destroy(slot, "held past close")
        # Work the workers may not live to do (their task group cancelled):
        # creations never started need nothing; queued destroys run here.
        while (queued := self._creators.take()) is not None:
            self._slots.remove(queued)
        while (queued := self._destroyers.take()) is not None:
            await self._destroy(queued)
        await self._wait_until(self._quiet)
        self._creators.stop()
        self._destroyers.stop()
        await self._wait_until(lambda: self._n_tasks == 0)
        # Anything whose destroy failed every time gets one last safe destroy.
        for slot in self._slots.of(VMState.LEAKED):
            with anyio.move_on_after(self.destroy_timeout):
                try:
                    await self.driver.safeDestroyVM(slot.vm)
                    self._slots.remove(slot)
                except Exception as e:
                    log.error("pool %s: VM %s could not be destroyed: %s", self.spec.key,
                              slot.vm.id, e)

    def status(self) -> PoolStatus:
        slots = self._slots

        def ids(state: VMState) -> list[int]:
            return sorted(_key(s) for s in slots.of(state))

        return PoolStatus(
            name=self.spec.name,
            key=self.spec.key,
            min_idle=self.min_idle,
            max_size=self.max_size,
            reuse=self.reuse,
            total=slots.live(),
            free=slots.count(VMState.FREE),
            busy=slots.count(VMState.BUSY),
            creating=slots.count(VMState.CREATING),
            destroying=slots.count(VMState.DESTROYING),
            waiting=len(self._waiters),
            failed=self._failed_total,
            consecutive_failures=self._consecutive_failures,
            backoff_remaining=max(0.0, self._backoff_until - clock()),
            last_error=self._last_error,
            leaked=ids(VMState.LEAKED),
            free_ids=ids(VMState.FREE),
            busy_ids=ids(VMState.BUSY),
            creating_ids=ids(VMState.CREATING),
            closed=self._closing,
            idle_timeout=self.idle_timeout,
            idle_target=self.idle_target(),
            usage=self.driver.usage().get(self.spec.name),
        )

    def inventory(self) -> list[TangoMachine]:
        """Every VM the pool knows of, whatever its state (for leak checks)."""
        return [slot.vm for slot in self._slots.all()]

    # ------------------------------------------------------------ internals

    def _quiet(self) -> bool:
        """No VM left (but leaked ones) and no creation or destroy in flight."""
        return (
            self._slots.taken() == 0
            and self._creators.idle()
            and self._destroyers.idle()
            and not self._backoff_wake.pending
        )

    def _make_available(self, slot: _Slot) -> None:
        slot.ready_at = clock()
        waiter = self._waiters.pop()
        if waiter is not None:
            self._slots.move(slot, VMState.BUSY)
            waiter.slot = slot
            waiter.event.set()
        else:
            self._slots.move(slot, VMState.FREE)

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
        slots = self._slots
        free = slots.free
        # Shrink: idle VMs over the cap or over the warm target go first
        # (the newest), then creations in flight over the cap.
        excess = slots.live() - self.max_size
        now = clock()
        target = self.idle_target(now)
        hold = self._hold()
        while free and (excess > 0 or len(free) > target):
            if excess <= 0 and hold > 0:
                # over the warm target only: the VM idle longest goes once
                # it has been idle for idle_timeout (adaptive: its hold)
                oldest = _Slots.first(free)
                assert oldest is not None
                expires = oldest.ready_at + hold
                if now < expires:
                    self._refill_at(self._idle_wake, expires)
                    break
                self._start_destroy(oldest, f"idle for {hold:g} s")
                continue
            newest = _Slots.last(free)
            assert newest is not None
            self._start_destroy(newest, "pool shrunk")
            excess -= 1
        a = self.adaptive
        if a is not None and len(free) > a.low and not self._closing:
            # the target falls as the rate decays, with no event to say so:
            # look again a while later (a quiet pool shrinks by itself)
            self._refill_at(self._idle_wake, now + max(1.0, min(a.hold, a.halflife) / 2))
        for slot in list(slots.creating.values()) if excess > 0 else ():
            if excess <= 0:
                break
            if self._cancel_creation(slot):
                excess -= 1
        # Grow: enough VMs for the warm target plus every waiting job, in
        # free slots only: a slot is taken until its VM is destroyed, so
        # max_size caps the VMs alive however slow destruction is.
        creating = len(slots.creating)
        want = target + len(self._waiters) - len(free) - creating
        room = self.max_size - slots.taken()
        n = min(want, room, self.create_concurrency - creating)
        if n <= 0:
            return
        if now < self._backoff_until:
            self._refill_at(self._backoff_wake, self._backoff_until)
            return
        for _ in range(n):
            slot = _Slot(self.spec.machine(self._next_vm_id()), VMState.CREATING, created_at=now)
            slot.scope = anyio.CancelScope()
            slots.add(slot)
            self._creators.put(slot)

    def idle_target(self, now: float | None = None) -> int:
        """How many free VMs the pool keeps now: ``min_idle``, or with
        adaptive sizing what the arrival rate asks for (see :class:`Adaptive`)."""
        a = self.adaptive
        if a is None:
            return self.min_idle
        load = self._rate.value(clock() if now is None else now) * (
            self._create_avg if self._create_avg is not None else a.create)
        want = math.ceil(load + a.margin * math.sqrt(load) + a.extra) if load > 0 else 0
        return max(a.low, min(want, a.high, self.max_size))

    def _hold(self) -> float:
        """How long free VMs over the target stay (0: destroyed at once)."""
        if self.adaptive is not None:
            return max(self.adaptive.hold, self.idle_timeout)
        return self.idle_timeout

    def _refill_at(self, wake: _Wake, at: float) -> None:
        """Rebalance at ``at`` (the loop's clock), through ``wake``: one
        pending at a time (the idle VM idle longest always expires first; a
        backoff extended meanwhile is seen then, and waited for again)."""
        if wake.pending:
            return
        scope = wake.scope = anyio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    await anyio.sleep(max(0.0, at - clock()))
            finally:
                wake.scope = None
            self._refill()

        self._spawn(run)

    def _cancel_creation(self, slot: _Slot) -> bool:
        """Cancel a creation in flight: its VM is destroyed once the
        creation has stopped, and holds its slot until then."""
        if slot.state is not VMState.CREATING or slot.scope is None:
            return False
        slot.cancelled = True
        slot.scope.cancel()
        self._slots.move(slot, VMState.DESTROYING)
        return True

    async def _create(self, slot: _Slot) -> None:
        vm = slot.vm
        if slot.cancelled:
            # cancelled before it started: nothing exists to destroy
            self._slots.remove(slot)
            self._refill()
            return
        error: BaseException | None = None
        scope = slot.scope
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
            if slot.state is VMState.CREATING:
                self._slots.move(slot, VMState.DESTROYING)
            await self._destroy(slot)
            raise
        if slot.cancelled:
            # the pool cancelled it (its slot is DESTROYING already)
            self._queue_destroy(slot, "creation cancelled")
            self._refill()
            return
        if scope.cancelled_caught and error is None:
            error = VMTimeoutError(step, limit)
        if error is None and not self._closing:
            self._consecutive_failures = 0
            took = clock() - slot.created_at
            self._create_avg = took if self._create_avg is None else (
                0.8 * self._create_avg + 0.2 * took)
            self._make_available(slot)
            log.debug("pool %s: VM %s ready", self.spec.key, vm.id)
            self._refill()
            return
        if error is not None:
            self._creation_failed(vm, error)
        self._start_destroy(slot, "creation failed" if error else "pool closing")
        self._refill()

    def _creation_failed(self, vm: TangoMachine, error: BaseException) -> None:
        self._failed_total += 1
        self._consecutive_failures += 1
        delay = min(
            self.backoff_max,
            self.backoff_initial * math.pow(2, min(self._consecutive_failures - 1, 30)),
        )
        self._backoff_until = clock() + delay
        detail = f"{type(error).__name__}: {error}"
        self._last_error = detail
        log.warning(
            "pool %s: creating VM %s failed (%s); next try in %.2f s",
            self.spec.key, vm.id, detail, delay,
        )
        if isinstance(error, NoRoomError):
            # backpressure, not a failure: the jobs wait for room (the next
            # VM of this pool destroyed ends the backoff)
            self._no_room = True
            return
        # The job at the head of the line takes the failure for this attempt.
        waiter = self._waiters.pop()
        if waiter is not None:
            waiter.error = (error if isinstance(error, VMMSError)
                            else InitializeVMError(f"creating VM failed: {detail}"))
            waiter.event.set()

    def _start_destroy(self, slot: _Slot, why: str) -> None:
        if slot.state in (VMState.DESTROYING, VMState.LEAKED):
            return
        self._slots.move(slot, VMState.DESTROYING)
        self._queue_destroy(slot, why)

    def _queue_destroy(self, slot: _Slot, why: str) -> None:
        log.debug("pool %s: destroying VM %s (%s)", self.spec.key, slot.vm.id, why)
        self._destroyers.put(slot)

    async def _destroy(self, slot: _Slot) -> None:
        """Destroy a VM: shielded from cancellation, each attempt bounded;
        its slot is free once this returns."""
        gone = False
        for attempt in range(self.destroy_attempts):
            problem = ""
            # one scope per attempt: shielded from the caller's cancellation,
            # bounded by its own deadline
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + self.destroy_timeout
                try:
                    await self.driver.destroyVM(slot.vm)
                    gone = True
                except Exception as e:
                    problem = str(e) or type(e).__name__
            if gone:
                break
            if scope.cancelled_caught:
                problem = f"timed out after {self.destroy_timeout:g} s"
            log.warning(
                "pool %s: destroying VM %s failed (attempt %d/%d): %s",
                self.spec.key, slot.vm.id, attempt + 1, self.destroy_attempts, problem,
            )
            if attempt + 1 < self.destroy_attempts:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(min(self.backoff_max, 0.05 * 2**attempt))
        if gone:
            self._slots.remove(slot)
            self._room()  # room again, maybe
        else:
            self._slots.move(slot, VMState.LEAKED)
            log.error("pool %s: VM %s could not be destroyed; kept as leaked", self.spec.key,
                      slot.vm.id)
        self._refill()  # its slot is free: a waiting job may get a VM now


class _Workers:
    """Up to ``limit`` long-lived tasks working through a queue; a worker is
    added when work waits and none is parked.

    Spawning a task per item would cost more than a fast driver's whole
    call, and so would a checkpoint per item: a worker takes what is queued
    back to back, and parks on an :class:`anyio.Event` when nothing is.
    Workers run in the pool's task group and end on :meth:`stop`.
    """

    def __init__(self, pool: Pool, work: Callable[[_Slot], Awaitable[None]], limit: int) -> None:
        self._pool = pool
        self._work = work
        self._limit = limit
        self._queue: deque[_Slot] = deque()
        self._parked: deque[anyio.Event] = deque()
        self._n = 0
        self._busy = 0
        self._stopping = False

    def put(self, slot: _Slot) -> None:
        self._queue.append(slot)
        if self._parked:
            self._parked.popleft().set()
        elif self._n < self._limit:
            self._n += 1
            self._pool._spawn(self._run)

    def idle(self) -> bool:
        return self._busy == 0 and not self._queue

    def take(self) -> _Slot | None:
        """Take a queued item to do it oneself (None when there is none)."""
        return self._queue.popleft() if self._queue else None

    def stop(self) -> None:
        self._stopping = True
        while self._parked:
            self._parked.popleft().set()

    async def _run(self) -> None:
        try:
            while True:
                while self._queue:
                    slot = self._queue.popleft()
                    self._busy += 1
                    try:
                        await self._work(slot)
                    finally:
                        self._busy -= 1
                        self._pool._changed()
                if self._stopping:
                    return
                parked = anyio.Event()
                self._parked.append(parked)
                await parked.wait()
        finally:
            self._n -= 1
