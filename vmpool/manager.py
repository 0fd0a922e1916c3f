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

import logging
import socket
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

from .config import Settings
from .errors import PoolClosedError, UnknownImageError
from .models import InputFile, TangoJob, TangoMachine
from .pool import Pool, PoolSpec, PoolStatus
from .registry import load_driver
from .scheduler import JobHandle, OnDone, Scheduler
from .vmms import VMMS

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
        self.owner = owner or f"vmpool-{socket.gethostname()}-{self.settings.prefix}"
        self._drivers: dict[str, VMMS] = dict(drivers or {})
        self._reconciled: set[str] = set()
        self._ready: dict[str, VMMS] = {}
        self._images: dict[str, list[str] | None] = {}
        self._driver_lock = anyio.Lock()
        self.pools: dict[PoolSpec, Pool] = {}
        self._on_done = list(on_done)
        self._first_job_id = first_job_id
        self._reconcile = reconcile
        self._vm_ids = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._scheduler: Scheduler | None = None
        self._closed = False

    # ------------------------------------------------------------------ life

    async def __aenter__(self) -> Manager:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._scheduler = Scheduler(
            self.settings,
            self.pool_for_job,
            self._tg,
            first_job_id=self._first_job_id,
            on_done=self._on_done,
        )
        try:
            for name in list(self._drivers):
                await self.driver(name)
        except BaseException:
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, *, cancel_jobs: bool = True) -> None:
        """Cancel (or finish) the jobs, destroy every VM, close the drivers."""
        if self._closed or self._tg is None:
            return
        self._closed = True
        tg = self._tg
        try:
            with anyio.CancelScope(shield=True):
                await self.scheduler.close(cancel=cancel_jobs)
                async with anyio.create_task_group() as closer:
                    for pool in self.pools.values():
                        closer.start_soon(pool.close)
                for driver in self._drivers.values():
                    try:
                        await driver.close()
                    except Exception:
                        log.exception("closing driver %s failed", driver.driver_name)
        finally:
            await tg.__aexit__(None, None, None)

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the manager is not started: use 'async with Manager(...)'")
        return self._scheduler

    # --------------------------------------------------------------- drivers

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
                drv = load_driver(name, **options)
                self._drivers[name] = drv
            if name not in self._reconciled:
                self._reconciled.add(name)
                if self._reconcile:
                    await self._reconcile_driver(drv)
            if name not in self._images:
                # Until the image list is known the driver is not ready: a
                # failure here is raised, and asked again next time (never
                # "any image goes").
                get_images = getattr(drv, "getImages", None)
                self._images[name] = await get_images() if get_images is not None else None
            self._ready[name] = drv
            return drv

    async def _reconcile_driver(self, drv: VMMS) -> None:
        """Destroy VMs of this owner that no pool owns (left by a crashed run)."""
        try:
            with anyio.fail_after(self.settings.destroy_timeout):
                found = await drv.getVMs()
        except (Exception, TimeoutError) as e:
            log.warning("driver %s: listing VMs for reconciliation failed: %s",
                        drv.driver_name, e)
            return
        owned = {(vm.name, vm.id) for p in self.pools.values() for vm in p.inventory()}
        orphans = [vm for vm in found if (vm.name, vm.id) not in owned]
        if orphans:
            log.info("driver %s: destroying %d VMs left by an earlier run", drv.driver_name,
                     len(orphans))
        for vm in orphans:
            try:
                with anyio.fail_after(self.settings.destroy_timeout):
                    await drv.destroyVM(vm)
            except (Exception, TimeoutError) as e:
                log.error("driver %s: orphan VM %s not destroyed: %s", drv.driver_name,
                          vm.instance_id or vm.id, e)
        # VM ids of this run start above any id an earlier run used.
        self._vm_ids = max([self._vm_ids, *(vm.id or 0 for vm in found)])

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
    ) -> Pool:
        """The pool for ``spec``, made (and started) on first use.

        The driver must already be loaded (``await mgr.driver(name)``);
        :meth:`ensure_pool` does both.
        """
        pool = self.pools.get(spec)
        if pool is not None:
            return pool
        if self._closed or self._tg is None:
            raise PoolClosedError("the manager is not running")
        drv = self._drivers.get(spec.vmms)
        if drv is None:
            raise RuntimeError(f"driver {spec.vmms!r} is not loaded")
        s = self.settings
        n = s.pool_size if size is None else size
        cap = max_size if max_size is not None else (s.pool_max_size or max(n, 1))
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
            next_vm_id=self._next_vm_id,
            task_group=self._tg,
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
    ) -> Pool:
        """Load the driver, check the image, and return (making) its pool."""
        spec = PoolSpec(image, vmms or self.settings.default_vmms, cores, memory, network)
        await self.driver(spec.vmms)
        self.check_image(spec)
        return self.pool(spec, size=size, max_size=max_size, reuse=reuse)

    def check_image(self, spec: PoolSpec) -> None:
        images = self._images.get(spec.vmms)
        if images is not None and spec.image not in images:
            raise UnknownImageError(
                f"unknown image {spec.image!r} for driver {spec.vmms!r} "
                f"(known: {', '.join(sorted(images)) or 'none'})"
            )

    def pool_for_job(self, job: TangoJob) -> Pool:
        spec = PoolSpec.from_machine(job.vm, self.settings.default_vmms)
        self.check_image(spec)
        return self.pool(spec)

    async def resize(self, image: str, size: int, **spec: Any) -> Pool:
        """Tango's prealloc: SET the size of ``image``'s pool. Returns at once."""
        pool = await self.ensure_pool(image, **spec)
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


__all__ = ["Manager", "make_job"]
