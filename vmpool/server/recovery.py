"""After a crash or a restart: every job that had not finished runs again,
or ends with an output file that says why it cannot.

- A job whose output file is whole and names it (its first line is its own
  ``Received job <name>:<id>``) finished before the crash: it is recorded
  as done and its callback sent. A file of the same name that is another
  job's (an earlier grading of the same handin) is not taken for it.
- A job that cannot run again (its image gone, an input missing, a bad
  spec) gets an output file with the reason, is recorded as done, and its
  callback is sent: Autolab never polls for it forever.
- A job whose driver cannot be reached waits, visible in ``/jobs``, and is
  submitted once the driver answers (tried again with backoff, in the
  background); other drivers' jobs run at once, and the server listens
  meanwhile.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ..errors import VMPoolError
from ..output import output_is_for, write_failure

if TYPE_CHECKING:
    from .routes import TangoServer
    from .store import StoredJob

log = logging.getLogger("vmpool.server")

#: pauses between tries to reach a driver that was down (doubling, capped)
DRIVER_RETRY_FIRST = 1.0
DRIVER_RETRY_MAX = 30.0


async def recover(server: TangoServer) -> tuple[int, int]:
    """Deal with every job a crash interrupted; returns (rerun or waiting, found complete)."""
    store, manager = server.store, server.manager
    rerun = complete = 0
    down: dict[str, list[StoredJob]] = {}
    called: set[int] = set()  # jobs whose callback is on its way already
    for s in await server.db(store.unfinished):
        job = s.job
        if s.id in manager.scheduler.live:
            continue  # already running (never twice)
        try:
            if await anyio.to_thread.run_sync(output_is_for, job.outputFile, job.name, job.id):
                await server.db(store.finish, job, "recovered", "output complete before restart")
                complete += 1
                if job.notifyURL:
                    server.callback(s.id, job.notifyURL, job.outputFile)
                    called.add(s.id)
                continue
            _remove_stale(job.outputFile)
            job.retries = 0
            job.assigned = False
            job.log(f"Job {job.name}:{job.id} requeued after a restart")
            vmms = job.vm.vmms or manager.settings.default_vmms
            if vmms in down:
                down[vmms].append(s)
                continue
            try:
                await manager.driver(vmms)
            except VMPoolError:
                raise  # vmpool's own word (an unknown driver, a bad option): final
            except Exception as e:
                log.warning("driver %s is unavailable (%s: %s): its jobs wait for it", vmms,
                            type(e).__name__, e)
                down[vmms] = [s]
                continue
            server.submit(job, s.key, s.courselab)
            rerun += 1
        except Exception as e:
            await cannot_run(server, s, str(e) if isinstance(e, VMPoolError) and str(e)
                             else f"{type(e).__name__}: {e}")
            called.add(s.id)
    for vmms, waiting in down.items():
        for s in waiting:
            server.waiting[s.id] = s.job
        rerun += len(waiting)
        server.background(_when_driver_answers, server, vmms, waiting)
    for s in await server.db(store.pending_callbacks):
        if s.job.notifyURL and s.id not in called:
            server.callback(s.id, s.job.notifyURL, s.job.outputFile)
    return rerun, complete


async def cannot_run(server: TangoServer, s: StoredJob, reason: str) -> None:
    """End a stored job that cannot run: output file, record, callback."""
    job = s.job
    message = f"Internal error: the job cannot be run after a restart: {reason}"
    log.error("job %s cannot be rerun: %s", s.id, reason)
    try:
        await anyio.to_thread.run_sync(write_failure, job.outputFile, job.name, job.id, message)
    except OSError as e:
        log.error("job %s: could not write its output file %s: %s", s.id, job.outputFile, e)
    server.waiting.pop(s.id, None)
    await server.db(server.store.finish, job, "internal_error", message)
    if job.notifyURL:
        server.callback(s.id, job.notifyURL, job.outputFile)


async def _when_driver_answers(server: TangoServer, vmms: str,
                               waiting: list[StoredJob]) -> None:
    """Try the driver again (backoff) until it answers; then submit its jobs."""
    delay = DRIVER_RETRY_FIRST
    while True:
        await anyio.sleep(delay)
        try:
            await server.manager.driver(vmms)
            break
        except Exception as e:
            log.info("driver %s still unavailable (%s); %d jobs wait", vmms,
                     type(e).__name__, len(waiting))
            delay = min(delay * 2, DRIVER_RETRY_MAX)
    log.info("driver %s is back: submitting %d jobs that waited for it", vmms, len(waiting))
    for s in waiting:
        if server.waiting.pop(s.id, None) is None:
            continue
        try:
            server.submit(s.job, s.key, s.courselab)
        except Exception as e:
            await cannot_run(server, s, f"{type(e).__name__}: {e}")


def _remove_stale(path: str) -> None:
    """Another job's output under this job's name must not stand for it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove stale output %s: %s", path, e)
