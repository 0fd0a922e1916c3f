"""The embedding API: one async context manager that owns drivers, pools and
the scheduler, and shuts them all down cleanly.

    async with vmpool.Manager(Settings(default_vmms="local")) as mgr:
        handle = await mgr.submit(job)
        result = await handle.wait()

Every background task (VM creation and destruction, job flows, backoff
timers) lives in the manager's task group; leaving the ``async with`` block
cancels the jobs still running (each ends with an output file saying so),
destroys every VM and awaits every task.
"""

from __future__ import annotations

import inspect
import logging
import socket
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import anyio

from .config import Settings
from .errors import JobError, PoolClosedError, UnknownImageError
from .lifetime import Lifetime
from .models import InputFile, TangoJob, TangoMachine
from .pool import Adaptive, Pool, PoolSpec, PoolStatus
from .registry import driver_factory, load_driver
from .scheduler import JobHandle, OnDone, Scheduler
from .stats import now as clock
from .vmms import VMMS, safe_name

log = logging.getLogger("vmpool.manager")


class Manager:
    """Drivers, pools and the scheduler of one vmpool instance.

    ``drivers`` maps a driver name to a ready instance (otherwise drivers are
    loaded by name from the ``vmpool.drivers`` entry points on first use,
    with ``settings.driver_options[name]`` as constructor options).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        drivers: dict[str, VMMS] | None = None,
        on_done: Sequence[OnDone] = (),
        owner: str | None = None,
        first_job_id: int = 1,
        reconcile: bool = True,
    ) -> None:
        self.settings = settings or Settings()
        #: whose VMs this manager's drivers make: its own (a fresh one unless
        #: given: two managers never share one by accident, and a restarted
        #: server passes the one it persisted)
        self.owner = owner or new_owner(self.settings.prefix)
        self._drivers: dict[str, VMMS] = dict(drivers or {})
        self._reconciled: set[str] = set()
        self._ready: dict[str, VMMS] = {}
        self._images: dict[str, list[str] | None] = {}
        self._driver_lock = anyio.Lock()
        self.pools: dict[PoolSpec, Pool] = {}
        #: (image, driver) -> the spec of the image's pool: where jobs that
        #: name no cores, memory or network go (prealloc sets it, as Tango's)
        self._image_specs: dict[tuple[str, str], PoolSpec] = {}
        #: pools a job's own spec made -> when last used (monotonic)
        self._implicit: dict[PoolSpec, float] = {}
        self._sweeper = anyio.CancelScope()  # the idle-pool sweep, cancelled at close
        #: the drivers' background work, cancelled at close
        self._driver_scopes: list[anyio.CancelScope] = []
        self._on_done = list(on_done)
        self._first_job_id = first_job_id
        self._reconcile = reconcile
        self._vm_ids = 0
        self._life = Lifetime(self.close)
        self._scheduler: Scheduler | None = None
        self._closing = False
        self._closed = anyio.Event()

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> Manager:
        tg = await self._life.enter()
        try:
            self._scheduler = Scheduler(
                self.settings,
                self.pool_for_job,
                tg,
                first_job_id=self._first_job_id,
                on_done=self._on_done,
            )
            tg.start_soon(self._drop_idle_pools)
            for drv in self._drivers.values():
                self._start_background(drv)
            for name in list(self._drivers):
                await self.driver(name)
        except BaseException:
            await self._life.abort()
            raise
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return await self._life.exit(typ, exc, tb)

    def request_close(self) -> None:
        """Ask the manager's owner to shut it down: the body of its ``async
        with`` is cancelled and the block finishes cleanly (jobs cancelled,
        every VM destroyed). Any task may call it; it returns at once."""
        self._life.request_close()

    async def close(self, *, cancel_jobs: bool = True) -> None:
        """Cancel (or finish) the jobs, destroy every VM, close the drivers.

        Any task may call it; a second call waits for the first. Called from
        another task than the owner's, it also ends the owner's ``async
        with`` block (as :meth:`request_close`).
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            with anyio.CancelScope(shield=True):
                self._sweeper.cancel()
                if self._scheduler is not None:
                    await self._scheduler.close(cancel=cancel_jobs)
                async with anyio.create_task_group() as closer:
                    for pool in self.pools.values():
                        closer.start_soon(pool.close)
                for scope in self._driver_scopes:
                    scope.cancel()
                for driver in self._drivers.values():
                    try:
                        await driver.close()
                    except Exception:
                        log.exception("closing driver %s failed", driver.driver_name)
        finally:
            self._closed.set()
            if not self._life.from_owner():
                self._life.request_close()

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the manager is not started: use 'async with Manager(...)'")
        return self._scheduler

    # --------------------------------------------------------------- drivers

    def drivers(self) -> dict[str, VMMS]:
        """The drivers loaded so far, by name."""
        return dict(self._drivers)

    async def driver(self, name: str) -> VMMS:
        """The driver called ``name``: loaded, reconciled and its images known."""
        ready = self._ready.get(name)
        if ready is not None:
            return ready
        async with self._driver_lock:
            drv = self._drivers.get(name)
            if drv is None:
                options = dict(self.settings.driver_options.get(name, {}))
                options.setdefault("owner", self.owner)
                options.setdefault("prefix", self.settings.prefix)
                # Tango's VM_ULIMIT_* settings: the autodriver's -f and -u,
                # for drivers that take them (their own options win)
                takes = _parameters(driver_factory(name))
                for option, value in (("fsize", self.settings.vm_ulimit_file_size),
                                      ("nproc", self.settings.vm_ulimit_user_proc)):
                    if option in takes:
                        options.setdefault(option, value)
                drv = load_driver(name, **options)
                self._drivers[name] = drv
                self._start_background(drv)
            # done once, when the driver answers: a driver that was down is
            # reconciled when it comes back, not skipped for good
            if name not in self._reconciled and (
                not self._reconcile or await self._reconcile_driver(drv)
            ):
                self._reconciled.add(name)
            if name not in self._images:
                # Until the image list is known the driver is not ready: a
                # failure here is raised, and asked again next time (never
                # "any image goes").
                self._images[name] = await drv.getImages()
            self._ready[name] = drv
            return drv

    def _start_background(self, drv: VMMS) -> None:
        """The driver's own background work, owned by the manager's task
        group, cancelled at close, inside an error boundary."""
        scope = anyio.CancelScope()
        self._driver_scopes.append(scope)

        async def run() -> None:
            with scope:
                try:
                    await drv.background()
                except Exception:
                    log.exception("driver %s: background work failed", drv.driver_name)

        self._life.task_group.start_soon(run)

    async def _reconcile_driver(self, drv: VMMS) -> bool:
        """Destroy the driver's orphans: VMs whose manager is provably gone
        (this owner's from an earlier process, or a dead owner's), never a
        live manager's (see VMMS.getOrphans). False if the driver could not
        even list them (to be tried again)."""
        try:
            with anyio.fail_after(self.settings.destroy_timeout):
                found = await drv.getVMs()
                orphans = await drv.getOrphans()
        except (Exception, TimeoutError) as e:
            log.warning("driver %s: listing VMs for reconciliation failed: %s",
                        drv.driver_name, e)
            return False
        owned = {vm.instance_id for p in self.pools.values() if p.spec.vmms == drv.driver_name
                 for vm in p.inventory() if vm.instance_id}
        orphans = [vm for vm in orphans if vm.instance_id is None or vm.instance_id not in owned]
        if orphans:
            log.info("driver %s: destroying %d VMs left by managers that are gone",
                     drv.driver_name, len(orphans))
        for vm in orphans:
            try:
                with anyio.fail_after(self.settings.destroy_timeout):
                    await drv.destroyVM(vm)
            except (Exception, TimeoutError) as e:
                log.error("driver %s: orphan VM %s not destroyed: %s", drv.driver_name,
                          vm.instance_id or vm.id, e)
        # VM ids of this run start above any id an earlier run used.
        self._vm_ids = max([self._vm_ids, *(vm.id or 0 for vm in found)])
        return True

    # ----------------------------------------------------------------- pools

    def _next_vm_id(self) -> int:
        self._vm_ids += 1
        return self._vm_ids

    def pool(
        self,
        spec: PoolSpec,
        *,
        size: int | None = None,
        max_size: int | None = None,
        reuse: bool | None = None,
        adaptive: Adaptive | None = None,
        fair: bool = True,
    ) -> Pool:
        """The pool for ``spec``, made (and started) on first use
        (``adaptive``: its warm target follows the arrivals, see
        :class:`vmpool.pool.Adaptive`).

        The driver must already be loaded (``await mgr.driver(name)``);
        :meth:`ensure_pool` does both.
        """
        pool = self.pools.get(spec)
        if pool is not None:
            return pool
        if self._closing or not self._life.running:
            raise PoolClosedError("the manager is not running")
        drv = self._drivers.get(spec.vmms)
        if drv is None:
            raise RuntimeError(f"driver {spec.vmms!r} is not loaded")
        s = self.settings
        n = s.pool_size if size is None else size
        cap = max_size if max_size is not None else (s.pool_max_size or max(n, 1))
        if adaptive is None and s.adaptive:
            adaptive = Adaptive(low=n, high=max(cap, n), margin=s.adaptive_margin,
                                hold=s.adaptive_hold, halflife=s.adaptive_halflife)
        pool = Pool(
            spec,
            drv,
            min_idle=n,
            max_size=max(cap, n),
            reuse=s.reuse_vms if reuse is None else reuse,
            create_concurrency=s.create_concurrency,
            initializevm_timeout=s.initializevm_timeout,
            waitvm_timeout=s.waitvm_timeout,
            destroy_timeout=s.destroy_timeout,
            backoff_initial=s.backoff_initial,
            backoff_max=s.backoff_max,
            idle_timeout=s.idle_timeout,
            adaptive=adaptive,
            fair=fair,
            next_vm_id=self._next_vm_id,
            task_group=self._life.task_group,
        )
        self.pools[spec] = pool
        pool.start()
        log.info("pool %s created (driver %s, size %d, max %d)", spec.key, spec.vmms, n,
                 pool.max_size)
        return pool

    async def ensure_pool(
        self,
        image: str,
        *,
        vmms: str | None = None,
        cores: int | None = None,
        memory: int | None = None,
        network: str | None = None,
        size: int | None = None,
        max_size: int | None = None,
        reuse: bool | None = None,
        adaptive: Adaptive | None = None,
        fair: bool = True,
    ) -> Pool:
        """Load the driver, check the image, and return (making) its pool."""
        spec = PoolSpec(image, vmms or self.settings.default_vmms, cores, memory, network)
        await self.driver(spec.vmms)
        self.check_image(spec)
        return self.pool(spec, size=size, max_size=max_size, reuse=reuse, adaptive=adaptive,
                         fair=fair)

    def check_image(self, spec: PoolSpec) -> None:
        images = self._images.get(spec.vmms)
        if images is not None and spec.image not in images:
            raise UnknownImageError(
                f"unknown image {spec.image!r} for driver {spec.vmms!r} "
                f"(known: {', '.join(sorted(images)) or 'none'})"
            )

    def pool_for_job(self, job: TangoJob) -> Pool:
        """The pool a job runs in.

        A job that names no cores, memory or network runs in its image's
        pool (the one prealloc sized, whatever its spec, as in Tango). One
        that names them runs in the pool made on purpose for that spec, or
        else in an *implicit* pool: no warm VM, dropped once idle for
        ``implicit_pool_idle`` seconds, at most ``max_implicit_pools`` of
        them (so 50 slightly different jobs never mean 50 pools of warm VMs).
        """
        spec = PoolSpec.from_machine(job.vm, self.settings.default_vmms)
        self.check_image(spec)
        self.check_limits(spec)
        if spec.cores is None and spec.memory is None and spec.network is None:
            return self.pool(self._image_specs.get((spec.image, spec.vmms), spec))
        if spec in self.pools and spec not in self._implicit:
            return self.pools[spec]
        return self._implicit_pool(spec)

    def check_limits(self, spec: PoolSpec) -> None:
        """Refuse cores or memory beyond what the driver can give one VM."""
        drv = self._drivers.get(spec.vmms)
        problems = []
        if drv is None:
            return
        for label, asked, most in (("cores", spec.cores, drv.max_cores),
                                   ("memory", spec.memory, drv.max_memory_mb)):
            if asked is not None and most is not None and asked > most:
                unit = " MB" if label == "memory" else ""
                problems.append(f"'{label}' {asked}{unit} is more than driver {spec.vmms!r} "
                                f"can give a VM ({most}{unit})")
        if problems:
            raise JobError(problems)

    def _implicit_pool(self, spec: PoolSpec) -> Pool:
        now = clock()
        if spec not in self.pools:
            if len(self._implicit) >= self.settings.max_implicit_pools:
                # room first: drop every implicit pool that is idle right now
                for idle in [s for s in self._implicit if self._idle(s)]:
                    self._drop(idle)
            if len(self._implicit) >= self.settings.max_implicit_pools:
                raise JobError(
                    f"too many distinct VM specs at once: {len(self._implicit)} pools made "
                    "by jobs' cores/memory are in use (setting max_implicit_pools); "
                    "try again later, or preallocate a pool for this spec"
                )
            cap = self.settings.pool_max_size or max(self.settings.pool_size, 1)
            self.pool(spec, size=0, max_size=cap)
        self._implicit[spec] = now
        return self.pools[spec]

    def _idle(self, spec: PoolSpec) -> bool:
        """No VM of the pool in use or on its way, and no live job for it
        (one just submitted may not be waiting for a VM yet)."""
        pool = self.pools.get(spec)
        if pool is None:
            return True
        st = pool.status()
        if st.busy or st.waiting or st.creating:
            return False
        default = self.settings.default_vmms
        return not any(
            h.job.vm is not None and PoolSpec.from_machine(h.job.vm, default) == spec
            for h in (self._scheduler.live.values() if self._scheduler else ())
        )

    def _drop(self, spec: PoolSpec) -> None:
        """Forget an implicit pool and close it in the background."""
        self._implicit.pop(spec, None)
        pool = self.pools.pop(spec, None)
        if pool is not None and self._life.running:
            log.info("pool %s dropped (made by a job's spec, now idle)", spec.key)
            self._life.task_group.start_soon(pool.close)

    async def _drop_idle_pools(self) -> None:
        """Every so often, drop the implicit pools idle for long enough."""
        every = max(0.05, min(30.0, self.settings.implicit_pool_idle / 4))
        with self._sweeper:
            while not self._closing:
                await anyio.sleep(every)
                now = clock()
                for spec, used in list(self._implicit.items()):
                    if not self._idle(spec):
                        self._implicit[spec] = now
                    elif now - used >= self.settings.implicit_pool_idle:
                        self._drop(spec)

    async def resize(self, image: str, size: int, **spec: Any) -> Pool:
        """Tango's prealloc: SET the size of ``image``'s pool. Returns at once.

        With cores/memory/network the image's pool becomes one of that spec
        (Tango's prealloc sizes the image's pool with the VM it describes):
        the image's earlier pool, if of another spec, is drained.
        """
        pool = await self.ensure_pool(image, **spec)
        key = (pool.spec.image, pool.spec.vmms)
        old = self._image_specs.get(key, PoolSpec(pool.spec.image, pool.spec.vmms))
        self._image_specs[key] = pool.spec
        self._implicit.pop(pool.spec, None)  # made on purpose now
        if old != pool.spec and old in self.pools:
            self.pools[old].resize(0)
        pool.resize(size)
        return pool

    def status(self) -> dict[str, PoolStatus]:
        return {p.spec.key: p.status() for p in self.pools.values()}

    def inventory(self) -> list[TangoMachine]:
        return [vm for p in self.pools.values() for vm in p.inventory()]

    # ------------------------------------------------------------------ jobs

    async def submit(self, job: TangoJob) -> JobHandle:
        """Accept ``job``; returns at once with its handle (see Scheduler.submit).

        Raises JobError naming every problem (UnknownImageError for an image
        the driver does not have) before anything runs.
        """
        if job.vm is not None and job.vm.image:
            await self.driver(job.vm.vmms or self.settings.default_vmms)
        return self.scheduler.submit(job)

    async def run(self, job: TangoJob) -> JobHandle:
        """Submit ``job`` and wait for it to end."""
        handle = await self.submit(job)
        await handle.wait()
        return handle

    async def join(self) -> None:
        """Wait until every accepted job has ended."""
        await self.scheduler.join()


def new_owner(prefix: str = "local") -> str:
    """A fresh owner id, ``vmpool-<host>-<prefix>-<8 hex digits>``."""
    return safe_name(f"vmpool-{socket.gethostname()}-{prefix}-{uuid.uuid4().hex[:8]}")


def _parameters(factory: Any) -> set[str]:
    """The keyword arguments a driver's constructor takes (none if unknown)."""
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def make_job(
    image: str,
    files: Sequence[tuple[str, str] | InputFile],
    output_file: str,
    *,
    name: str = "job",
    vmms: str | None = None,
    timeout: float = 0,
    max_output: int = 0,
    disable_network: bool = True,
    cores: int | None = None,
    memory: int | None = None,
    notify_url: str | None = None,
) -> TangoJob:
    """A TangoJob from plain arguments (``files``: ``(localFile, destFile)`` pairs)."""
    from .models import pool_name

    inputs = [f if isinstance(f, InputFile) else InputFile(f[0], f[1]) for f in files]
    vm = TangoMachine(name=pool_name(image), image=image, vmms=vmms, cores=cores, memory=memory)
    return TangoJob(
        vm=vm,
        outputFile=output_file,
        name=name,
        input=inputs,
        notifyURL=notify_url,
        timeout=timeout,
        maxOutputFileSize=max_output,
        disableNetwork=disable_network,
    )


__all__ = ["Manager", "make_job", "new_owner"]
