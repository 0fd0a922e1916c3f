"""The scheduler: pairs queued jobs with warm VMs and walks each job through
Tango's flow (tango-compat.md section 3).

Each accepted job is one task in the scheduler's task group. It waits in its
own pool's FIFO (so an empty or failing pool delays only its own jobs), then
runs waitVM, copyIn, runJob and copyOut, each under a deadline that is a
cancel scope. System errors are retried on a fresh VM; the job's own result
(success, failing make, its own timeout) never is. Whatever happens — a
driver raising something unexpected, a cancel, a shutdown — the job ends
exactly once with an output file that says what happened.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from .config import Settings
from .errors import JobError, PoolClosedError, VMMSError
from .metrics import Histogram
from .models import TangoJob, TangoMachine
from .output import HERE_IS_OUTPUT, autograder_line, finish_output, temp_path_for
from .pool import Lease, Pool
from .stats import now as clock
from .threads import SerialThread
from .vmms import EXIT_OK, EXIT_OSERROR, EXIT_TIMEOUT, EXIT_USAGE, check_input_files, format_seconds

log = logging.getLogger("vmpool.scheduler")


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class Outcome(enum.Enum):
    #: the autodriver returned normally (whatever make returned)
    SUCCESS = "success"
    #: the job ran and the autodriver reported a problem (usage, unknown status)
    ERROR = "error"
    #: the job's own time limit
    TIMEOUT = "timeout"
    #: system errors on every try
    INTERNAL_ERROR = "internal_error"
    CANCELLED = "cancelled"


@dataclass
class JobResult:
    id: int
    name: str
    outcome: Outcome
    #: the closing message written to the output file
    message: str
    output_file: str
    #: the autodriver's exit code, when it ran
    exit_status: int | None
    #: Tango's step results of the last try: waitvm, copyin, runjob, copyout
    steps: dict[str, int | None]
    retries: int
    #: why each failed try failed
    failures: list[str]
    #: False only when even the output file could not be written
    output_written: bool
    submitted_at: float
    finished_at: float
    #: seconds from "VM free and job queued" to runJob start, last try
    dispatch_overhead: float | None = None
    #: when the last try got its VM (same clock as submitted_at): the job
    #: waited ``assigned_at - submitted_at`` in all
    assigned_at: float | None = None

    @property
    def queue_wait(self) -> float | None:
        """Seconds from submission until the VM of the last try was handed over."""
        return None if self.assigned_at is None else self.assigned_at - self.submitted_at

    @property
    def run_seconds(self) -> float | None:
        """Seconds the last try held its VM (copyIn to copyOut): what the job
        costs a VM, as traces record it."""
        return None if self.assigned_at is None else self.finished_at - self.assigned_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "outcome": self.outcome.value,
            "message": self.message,
            "output_file": self.output_file,
            "exit_status": self.exit_status,
            "steps": dict(self.steps),
            "retries": self.retries,
            "failures": list(self.failures),
            "output_written": self.output_written,
            "elapsed": round(self.finished_at - self.submitted_at, 6),
            "dispatch_overhead": self.dispatch_overhead,
            "queue_wait": None if self.queue_wait is None else round(self.queue_wait, 6),
        }


class JobHandle:
    """What :meth:`Scheduler.submit` returns: await the result, or cancel."""

    def __init__(self, job: TangoJob, pool: Pool) -> None:
        assert job.id is not None
        self.job = job
        self.id: int = job.id
        self.pool = pool
        self.state = JobState.QUEUED
        self.result: JobResult | None = None
        self.submitted_at = clock()
        self.vm: TangoMachine | None = None
        #: the scope the job's task runs in (cancel() cancels it)
        self.scope = anyio.CancelScope()
        #: when the job (its last try) got its VM
        self.assigned_at: float | None = None
        self._cancel_reason: str | None = None
        self._done = anyio.Event()

    @property
    def cancel_reason(self) -> str | None:
        """Why the job was cancelled (None if it was not)."""
        return self._cancel_reason

    def ended(self, result: JobResult) -> None:
        """The job's end (the scheduler's, once): its result, and its waiters woken."""
        self.result = result
        self.state = JobState.DONE
        self._done.set()

    def done(self) -> bool:
        return self.result is not None

    async def wait(self) -> JobResult:
        """Wait until the job has ended (its output file is in place)."""
        await self._done.wait()
        assert self.result is not None
        return self.result

    def cancel(self, reason: str = "cancelled by request") -> bool:
        """Cancel the job in whatever state it is. False if it had already ended.

        A queued job leaves its queue; a running one is cancelled where it
        stands and its VM destroyed. Either way it ends with an output file
        that says it was cancelled.
        """
        if self.result is not None:
            return False
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self.scope.cancel()
        return True

    def __repr__(self) -> str:
        return f"<JobHandle {self.job.name}:{self.id} {self.state.value}>"


@dataclass
class Counters:
    """Tango's ``/info`` counters plus outcome counts."""

    job_requests: int = 0
    job_retries: int = 0
    waitvm_timeouts: int = 0
    runjob_timeouts: int = 0
    copyin_errors: int = 0
    runjob_errors: int = 0
    copyout_errors: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome})


class _SystemFailure(Exception):
    """One try failed for a reason that is not the job's: retry on a fresh VM."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Final:
    outcome: Outcome
    message: str
    exit_status: int | None = None
    feedback: str | None = None
    extra: list[str] = field(default_factory=list)


OnDone = Callable[[JobHandle], Awaitable[None] | None]


class Scheduler:
    """Runs jobs on VMs taken from pools.

    ``pool_for`` maps a job to its pool (made on first use by the caller);
    ``task_group`` owns every job task. ``on_done`` hooks run after a job's
    output file is in place (the HTTP server hangs its callbacks there).
    """

    def __init__(
        self,
        settings: Settings,
        pool_for: Callable[[TangoJob], Pool],
        task_group: anyio.abc.TaskGroup,
        *,
        first_job_id: int = 1,
        on_done: list[OnDone] | None = None,
    ) -> None:
        self.settings = settings
        self._pool_for = pool_for
        self._tg = task_group
        self._next_id = first_job_id
        self.on_done: list[OnDone] = list(on_done or [])
        self.counters = Counters()
        self.queue_wait = Histogram(
            "queue_wait_seconds", "From a job's try being queued to its VM being handed over.",
            "pool")
        self.step_seconds = Histogram(
            "step_seconds", "Duration of each VMMS step of a job that completed it.", "step")
        self.job_seconds = Histogram(
            "job_seconds", "From submission to the output file in place, by outcome.", "outcome")
        self.live: dict[int, JobHandle] = {}
        self._closing = False
        #: set by a server that keeps its jobs in a store: jobs cancelled by
        #: the shutdown get no output file (they run again after restart)
        self.abandoning = False
        self._idle_events: list[anyio.Event] = []
        self.started_at = time.time()
        self._writer = SerialThread("vmpool-output")

    # -------------------------------------------------------------- submit

    def validate(self, job: TangoJob) -> None:
        """Raise one JobError naming every problem with ``job``."""
        problems: list[str] = []
        if not job.name or not isinstance(job.name, str):
            problems.append("job has no name")
        if not job.vm or not job.vm.image:
            problems.append("job names no image")
        if not job.outputFile:
            problems.append("job has no output file")
        else:
            out_dir = os.path.dirname(os.path.abspath(job.outputFile))
            if not os.path.isdir(out_dir):
                problems.append(f"output directory {out_dir} does not exist")
        if not isinstance(job.timeout, int | float) or job.timeout < 0:
            problems.append(f"timeout must be a number >= 0, got {job.timeout!r}")
        if not isinstance(job.maxOutputFileSize, int) or job.maxOutputFileSize < 0:
            problems.append(
                f"maxOutputFileSize must be an int >= 0, got {job.maxOutputFileSize!r}"
            )
        try:
            check_input_files(job.input)
        except JobError as e:
            problems.extend(e.problems)
        for f in job.input:
            if not os.path.isfile(f.localFile):
                problems.append(f"input file {f.localFile} does not exist")
        if job.input and not any(f.destFile == "Makefile" for f in job.input):
            problems.append("no input file has destFile 'Makefile'")
        if problems:
            raise JobError(problems)

    def submit(self, job: TangoJob) -> JobHandle:
        """Accept ``job`` and return at once with its handle.

        Raises JobError (naming every problem) if the job cannot run, and
        PoolClosedError once the scheduler is closing.
        """
        if self._closing:
            raise PoolClosedError("the scheduler is closed and takes no more jobs")
        self.validate(job)
        if job.id is not None and job.id in self.live:
            raise JobError(f"job {job.id} is already queued or running")
        pool = self._pool_for(job)
        if job.id is None:
            job.id = self._next_id
            self._next_id += 1
        else:
            self._next_id = max(self._next_id, job.id + 1)
        handle = JobHandle(job, pool)
        self.live[handle.id] = handle
        self.counters.job_requests += 1
        job.log(f"Added job {job.name}:{job.id} to queue")
        self._tg.start_soon(self._run, handle)
        return handle

    # ------------------------------------------------------------ shutdown

    async def join(self) -> None:
        """Wait until every accepted job has ended."""
        while self.live:
            ev = anyio.Event()
            self._idle_events.append(ev)
            await ev.wait()

    async def close(self, *, cancel: bool = True) -> None:
        """Take no more jobs; cancel (or, with ``cancel=False``, finish) the rest."""
        self._closing = True
        if cancel:
            for h in list(self.live.values()):
                h.cancel("vmpool is shutting down")
        await self.join()
        self._writer.close()

    # ------------------------------------------------------------ job flow

    async def _run(self, h: JobHandle) -> None:
        final: _Final | None = None
        failures: list[str] = []
        steps: dict[str, int | None] = _fresh_steps()
        overhead: list[float] = []
        try:
            with h.scope:
                # cancelled before it started: a cancel scope only acts at an
                # await, and a fast driver may never reach one
                if not h.scope.cancel_called:
                    final = await self._tries(h, failures, steps, overhead)
        except Exception as e:
            # A bug of ours, not the driver's (those are caught per try): the
            # job still ends, and says so.
            log.exception("job %s:%s: unexpected error", h.job.name, h.id)
            final = _Final(Outcome.INTERNAL_ERROR, f"Internal error: {type(e).__name__}: {e}")
        finally:
            with anyio.CancelScope(shield=True):
                if final is None:
                    reason = h.cancel_reason or "vmpool is shutting down"
                    final = _Final(Outcome.CANCELLED, f"Error: Job cancelled ({reason})")
                # Let the job that was just handed our VM start its run before
                # we spend time writing our output file.
                await anyio.lowlevel.checkpoint()  # inside the shield: cannot raise
                await self._finish(h, final, failures, steps, overhead)

    async def _tries(
        self,
        h: JobHandle,
        failures: list[str],
        steps: dict[str, int | None],
        overhead: list[float],
    ) -> _Final:
        job = h.job
        while True:
            steps.update(_fresh_steps())
            try:
                return await self._try_once(h, steps, overhead)
            except _SystemFailure as f:
                failures.append(f.reason)
                job.log(f"Job {job.name}:{job.id} failed: {f.reason}")
                log.warning("job %s:%s try %d failed: %s", job.name, job.id, job.retries + 1,
                            f.reason)
            if job.retries >= self.settings.job_retries:
                n = self.settings.job_retries
                return _Final(
                    Outcome.INTERNAL_ERROR,
                    f"Internal error: Unable to complete job after {n} tries. Please resubmit",
                    extra=[
                        "Job status: waitVM={} copyIn={} runJob={} copyOut={}".format(
                            steps["waitvm"], steps["copyin"], steps["runjob"], steps["copyout"]
                        )
                    ],
                )
            job.retries += 1
            self.counters.job_retries += 1
            h.state = JobState.QUEUED

    async def _try_once(
        self, h: JobHandle, steps: dict[str, int | None], overhead: list[float]
    ) -> _Final:
        job, pool = h.job, h.pool
        queued_at = clock()
        entered = False
        try:
            if job.accessKeyId and not job.accessKey and pool.driver.job_owned_vms:
                # a job-owned job whose key the store could not unseal
                return _Final(Outcome.INTERNAL_ERROR,
                              "Error: the job's accessKey was lost (the server's store key "
                              "changed); resubmit the job")
            if job.accessKeyId and job.accessKey and pool.driver.job_owned_vms:
                # Tango's job-owned VM: made with the job's credentials for
                # this try only, destroyed when the block ends
                s = self.settings
                owned = pool.driver.job_vm(
                    pool.spec.machine(pool.new_vm_id()), job.accessKeyId, job.accessKey,
                    s.initializevm_timeout + s.waitvm_timeout)
                async with owned as vm:
                    entered = True
                    return await self._on_vm(h, _OwnedLease(vm), steps, overhead, queued_at)
            # The lease gives the VM back however the block ends: nothing
            # stands between taking it and the path that returns it.
            async with pool.lease(front=job.retries > 0, key=job.courselab) as lease:
                entered = True
                return await self._on_vm(h, lease, steps, overhead, queued_at)
        except VMMSError as e:
            if entered:
                raise
            raise _SystemFailure(f"Internal error: initializeVM failed: {e}") from None
        except PoolClosedError:
            if entered:
                raise
            reason = h.cancel_reason or f"pool {pool.spec.key} was closed"
            return _Final(Outcome.CANCELLED, f"Error: Job cancelled ({reason})")

    async def _on_vm(
        self, h: JobHandle, lease: Lease | _OwnedLease, steps: dict[str, int | None],
        overhead: list[float], queued_at: float,
    ) -> _Final:
        """One try on the VM the lease holds; sets ``lease.healthy`` when the
        VM may serve another job."""
        job, pool, s = h.job, h.pool, self.settings
        driver = pool.driver
        self.queue_wait.observe(pool.spec.key, clock() - queued_at)
        vm = lease.vm
        h.vm = vm
        h.assigned_at = clock()
        h.state = JobState.RUNNING
        job.assigned = True
        job.vm.id = vm.id  # the VM it runs on (Tango's job.vm; /jobs shows vm.id)
        job.vm.domain_name = vm.domain_name  # and where, for a driver of many hosts
        vm_name = driver.instanceName(vm.id, vm.name)
        job.log(f"Assigned job {job.name}:{job.id} existing VM {vm_name}")
        feedback = temp_path_for(job.outputFile, f"vmpool-{job.id}-{job.retries}.feedback")
        timeout = job.timeout or s.runjob_timeout
        status: int | None = None
        step = "waitvm"
        error: Exception | None = None
        try:
            # One cancel scope for the whole try; its deadline moves with the
            # step, so that when it fires `step` says which one overran.
            with anyio.CancelScope() as deadline:
                try:
                    t = anyio.current_time()
                    deadline.deadline = t + s.waitvm_timeout
                    await driver.waitVM(vm, s.waitvm_timeout)
                    steps["waitvm"] = 0

                    step = "copyin"
                    t = self._stepped("waitvm", t)
                    deadline.deadline = t + s.copyin_timeout
                    await driver.copyIn(vm, job.input)
                    steps["copyin"] = 0
                    t = self._stepped("copyin", t)
                    job.log(f"Input copied for job {job.name}:{job.id} [status=0]")

                    # The autodriver stops the job at `timeout`; if runJob has
                    # not returned `runjob_grace` later it is cancelled, and the
                    # VM destroyed (release below: it is not healthy).
                    step = "runjob"
                    started = clock()
                    overhead.append(started - max(queued_at, lease.ready_at))
                    t = anyio.current_time()
                    deadline.deadline = t + timeout + s.runjob_grace
                    status = await driver.runJob(
                        vm, timeout, job.maxOutputFileSize or s.max_output_file_size,
                        job.disableNetwork,
                    )
                    steps["runjob"] = status
                    t = self._stepped("runjob", t)
                    job.log(f"Job {job.name}:{job.id} executed [status={status}]")

                    if status != EXIT_OSERROR:
                        step = "copyout"
                        deadline.deadline = t + s.copyout_timeout
                        await driver.copyOut(vm, feedback)
                        steps["copyout"] = 0
                        self._stepped("copyout", t)
                        job.log(f"Output copied for job {job.name}:{job.id} [status=0]")
                except Exception as e:
                    error = e
            if deadline.cancelled_caught or error is not None:
                return self._step_failed(step, error, steps, timeout, vm_name)

            assert status is not None
            if status == EXIT_OSERROR:
                self.counters.runjob_errors += 1
                raise _SystemFailure("Error: OS error while running job on VM")
            if status == EXIT_OK:
                lease.healthy = True
                return _Final(Outcome.SUCCESS, "Success: Autodriver returned normally",
                              status, feedback)
            if status == EXIT_TIMEOUT:
                self.counters.runjob_timeouts += 1
                return _Final(Outcome.TIMEOUT,
                              f"Error: Job timed out after {format_seconds(timeout)} seconds",
                              status, feedback)
            self.counters.runjob_errors += 1
            if status == EXIT_USAGE:
                return _Final(Outcome.ERROR, f"Error: Autodriver usage error (status={status})",
                              status, feedback)
            return _Final(Outcome.ERROR, f"Error: Unknown autodriver error (status={status})",
                          status, feedback)
        except BaseException:
            _unlink(feedback)
            raise

    def _stepped(self, step: str, started: float) -> float:
        now = anyio.current_time()
        self.step_seconds.observe(step, now - started)
        return now

    def _step_failed(
        self,
        step: str,
        error: Exception | None,
        steps: dict[str, int | None],
        timeout: float,
        vm_name: str,
    ) -> _Final:
        """Account for a step that raised (``error``) or overran (None).

        A runJob that overran its deadline is the job's own timeout, a
        normal result; anything else is a system error, raised to be retried.
        """
        s, c = self.settings, self.counters
        code = error.status if isinstance(error, VMMSError) else -1
        steps[step] = code
        detail = _desc(error) if error is not None else None
        if step == "waitvm":
            if error is None:
                c.waitvm_timeouts += 1
                raise _SystemFailure(
                    f"Internal error: waitVM timeout after {s.waitvm_timeout:g} secs"
                )
            raise _SystemFailure(f"Internal error: VM {vm_name} not ready: {detail}")
        if step == "copyin":
            c.copyin_errors += 1
            detail = detail or f"timed out after {s.copyin_timeout:g} s"
            raise _SystemFailure(f"Error: Copy in to VM failed (status={code}): {detail}")
        if step == "runjob":
            if error is None:
                c.runjob_timeouts += 1
                limit = format_seconds(timeout + s.runjob_grace)
                return _Final(
                    Outcome.TIMEOUT,
                    f"Error: Job timed out after {format_seconds(timeout)} seconds",
                    extra=[
                        f"runJob did not return within {limit} s; "
                        f"the job was stopped and VM {vm_name} destroyed"
                    ],
                )
            c.runjob_errors += 1
            raise _SystemFailure(f"Internal error: runJob failed: {detail}")
        c.copyout_errors += 1
        detail = detail or f"timed out after {s.copyout_timeout:g} s"
        raise _SystemFailure(f"Error: Copy out from VM failed (status={code}): {detail}")

    async def _finish(
        self,
        h: JobHandle,
        final: _Final,
        failures: list[str],
        steps: dict[str, int | None],
        overhead: list[float],
    ) -> None:
        job = h.job
        lines = [autograder_line(f"Received job {job.name}:{job.id}")]
        for i, reason in enumerate(failures, 1):
            lines.append(autograder_line(f"Try {i} failed: {reason}"))
        lines.append(autograder_line(final.message))
        lines.extend(autograder_line(x) for x in final.extra)
        lines.append(autograder_line(HERE_IS_OUTPUT))
        written = True
        if self.abandoning and final.outcome is Outcome.CANCELLED:
            written = False
            if final.feedback is not None:
                _unlink(final.feedback)
        else:
            try:
                if self.settings.output_in_loop:
                    # a simulation under a virtual clock: no thread, whose
                    # wait would let the clock jump
                    finish_output(job.outputFile, "".join(lines), final.feedback)
                else:
                    # in the writer thread: a 64 MiB feedback (or an fsync)
                    # must not stall the event loop, and a burst of finishing
                    # jobs costs one hand-off, not one each
                    await self._writer.call(
                        finish_output, job.outputFile, "".join(lines), final.feedback,
                        shielded=True,  # _run's finishing shield
                    )
            except OSError as e:
                written = False
                log.error("job %s:%s: could not write output file %s: %s", job.name, job.id,
                          job.outputFile, e)
                if final.feedback is not None:
                    _unlink(final.feedback)
        # The last trace line is Tango's bare closing message: Autolab's jobs
        # page marks a finished job Failed when it contains "Error", so the
        # job's name (a course or student may be called "Error...") stays out.
        job.log(closing_trace(final.message, final.outcome, failures, self.settings.job_retries))
        job.assigned = False
        result = JobResult(
            id=h.id,
            name=job.name,
            outcome=final.outcome,
            message=final.message,
            output_file=job.outputFile,
            exit_status=final.exit_status,
            steps=dict(steps),
            retries=job.retries,
            failures=failures,
            output_written=written,
            submitted_at=h.submitted_at,
            finished_at=clock(),
            dispatch_overhead=overhead[-1] if overhead else None,
            assigned_at=h.assigned_at,
        )
        self.counters.outcomes[final.outcome.value] += 1
        self.job_seconds.observe(final.outcome.value, result.finished_at - h.submitted_at)
        if self.live.get(h.id) is h:
            del self.live[h.id]
        h.ended(result)
        if not self.live:
            events, self._idle_events = self._idle_events, []
            for ev in events:
                ev.set()
        for hook in self.on_done:
            try:
                r = hook(h)
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("job %s:%s: on_done hook %r failed", job.name, job.id, hook)


class _OwnedLease:
    """A job-owned VM, held as a pool's lease is (its ``healthy`` changes
    nothing: it is destroyed after its job)."""

    def __init__(self, vm: TangoMachine) -> None:
        self.vm = vm
        self.healthy = False
        self.ready_at = clock()


def closing_trace(message: str, outcome: Outcome, failures: list[str], tries: int) -> str:
    """A finished job's last trace line: Tango's closing message for the outcome.

    Success, timeouts and autodriver errors: the output file's message, as is.
    Internal errors as Tango master's worker words them ("Internal Error:
    <reason>. Unable to complete job after N tries. Please resubmit."), with
    its capital "Error" that Autolab looks for.
    """
    if outcome is not Outcome.INTERNAL_ERROR:
        return message
    if not failures:  # a bug of ours, not a try that failed
        return message if "Error" in message else f"Internal Error: {message}"
    return (f"Internal Error: {failures[-1]}. Unable to complete job after {tries} tries. "
            "Please resubmit.")


def _fresh_steps() -> dict[str, int | None]:
    return {"waitvm": None, "copyin": None, "runjob": None, "copyout": None}


def _desc(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, VMMSError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__



def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
