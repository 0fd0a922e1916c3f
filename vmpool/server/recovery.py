"""After a crash or a restart: every job that had not finished runs again."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ..errors import VMPoolError

if TYPE_CHECKING:
    from .routes import TangoServer

log = logging.getLogger("vmpool.server")


async def recover(server: TangoServer) -> tuple[int, int]:
    """Run again every job a crash interrupted; returns (rerun, found complete)."""
    store, manager = server.store, server.manager
    rerun = complete = 0
    for s in await anyio.to_thread.run_sync(store.unfinished):
        job = s.job
        if s.id in manager.scheduler.live:
            continue  # already running (never twice)
        if await anyio.Path(job.outputFile).is_file():
            # finished before the crash (the output is renamed into place
            # only when whole; addJob removed any stale one)
            store.finish(job, "recovered", "output complete before restart")
            complete += 1
            if job.notifyURL:
                server.callback(s.id, job.notifyURL, job.outputFile)
            continue
        job.retries = 0
        job.assigned = False
        job.log(f"Job {job.name}:{job.id} requeued after a restart")
        try:
            await manager.driver(job.vm.vmms or manager.settings.default_vmms)
            server.submit(job, s.key, s.courselab)
            rerun += 1
        except VMPoolError as e:
            log.error("job %s cannot be rerun: %s", s.id, e)
            store.finish(job, "internal_error", f"cannot rerun after restart: {e}")
    for s in await anyio.to_thread.run_sync(store.pending_callbacks):
        if s.job.notifyURL:
            server.callback(s.id, s.job.notifyURL, s.job.outputFile)
    return rerun, complete
