"""A workload run through vmpool's own scheduler, fast: the real
:class:`~vmpool.Manager`, :class:`~vmpool.Scheduler` and
:class:`~vmpool.Pool`, on the ``sim`` driver, under a virtual clock.

The clock is trio's ``MockClock`` with ``autojump_threshold=0`` (anyio runs
the same code on trio as on asyncio): whenever every task is waiting, the
clock jumps to the next timer. A 6-hour trace then takes as long as the
scheduling work itself, not 6 hours; every deadline, backoff and idle timeout
of the pool and the scheduler runs in that clock (they read the event
loop's clock, :func:`vmpool.stats.now`). Output files are written in the
event loop (``Settings.output_in_loop``: a thread's wait would let the clock
jump) to a RAM directory, and removed as each job ends.

What the sim driver's calls take (:class:`Latencies`) comes from a
calibration of a real driver (``vmpool bench --calibrate``) or is given.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..config import Settings
from ..manager import Manager, make_job
from ..models import TangoMachine
from ..pool import Adaptive
from ..scheduler import JobHandle
from ..stats import percentile
from .clock import run_virtual
from .workload import Arrival

#: job durations are rounded to this (seconds) so jobs share their sim-job files
DURATION_STEP = 0.1


@dataclass(frozen=True)
class Latencies:
    """Seconds each VMMS call of the sim driver takes (a real driver's,
    measured by ``vmpool bench --calibrate``, or given)."""

    initializeVM: float = 20.0
    waitVM: float = 5.0
    copyIn: float = 0.05
    copyOut: float = 0.05
    destroyVM: float = 2.0
    #: where the numbers come from ("given", "calibrated: docker ...")
    source: str = "given"

    @property
    def create(self) -> float:
        """Seconds from "make a VM" to "it can take a job"."""
        return self.initializeVM + self.waitVM

    def sim_latency(self) -> dict[str, float]:
        return {"initializeVM": self.initializeVM, "waitVM": self.waitVM,
                "copyIn": self.copyIn, "copyOut": self.copyOut, "destroyVM": self.destroyVM}

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Latencies:
        """From a calibration file (JSON: the fields of this class)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"latencies file {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"latencies file {path}: not a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"latencies file {path}: unknown fields {sorted(unknown)}")
        for k, v in raw.items():
            if k != "source" and (not isinstance(v, int | float) or v < 0):
                raise ValueError(f"latencies file {path}: {k} must be a number >= 0, got {v!r}")
        return cls(**raw)


@dataclass(frozen=True)
class Candidate:
    """Pool settings to try: warm size, cap, reuse, adaptive sizing."""

    min_idle: int
    max_size: int
    reuse: bool = False
    adaptive: Adaptive | None = None
    idle_timeout: float = 0.0
    #: the line fair between courselabs (vmpool's default); False: one FIFO
    fair: bool = True

    @property
    def label(self) -> str:
        if self.adaptive is not None:
            a = self.adaptive
            base = (f"adaptive {a.low}-{min(a.high, self.max_size)} "
                    f"(margin {a.margin:g}, hold {a.hold:g} s)")
        else:
            base = f"warm {self.min_idle}, max {self.max_size}"
        return base + (", reuse" if self.reuse else "") + ("" if self.fair else ", FIFO")


@dataclass
class Sample:
    """The pools at one moment (all images together)."""

    t: float
    arrivals: int
    waiting: int
    busy: int
    free: int
    creating: int
    live: int


@dataclass
class Result:
    candidate: Candidate
    latencies: Latencies
    jobs: int
    #: seconds each job waited for its VM (submission -> VM handed over)
    waits: list[float]
    waits_by_courselab: dict[str, list[float]]
    outcomes: Counter[str]
    #: VM-seconds: every VM from the start of its creation to the end of its destruction
    vm_seconds: float
    #: seconds VMs spent running jobs
    busy_seconds: float
    peak_vms: int
    #: simulated seconds from the first arrival to the last job's end
    makespan: float
    wall_seconds: float
    timeline: list[Sample] = field(default_factory=list)
    #: per courselab, when its last job ended (seconds from the start)
    last_end_by_courselab: dict[str, float] = field(default_factory=dict)
    #: per courselab, (submitted, waited) of each job (seconds from the start)
    waits_at: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def wait(self, q: float, courselab: str | None = None) -> float:
        values = self.waits if courselab is None else self.waits_by_courselab.get(courselab, [])
        return percentile(values, q) if values else math.nan

    @property
    def utilisation(self) -> float:
        return self.busy_seconds / self.vm_seconds if self.vm_seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "setting": self.candidate.label,
            "min_idle": self.candidate.min_idle,
            "max_size": self.candidate.max_size,
            "reuse": self.candidate.reuse,
            "adaptive": asdict(self.candidate.adaptive) if self.candidate.adaptive else None,
            "jobs": self.jobs,
            "wait_p50_s": round(self.wait(50), 3),
            "wait_p95_s": round(self.wait(95), 3),
            "wait_p99_s": round(self.wait(99), 3),
            "wait_max_s": round(max(self.waits, default=0.0), 3),
            "utilisation": round(self.utilisation, 4),
            "vm_hours": round(self.vm_seconds / 3600, 3),
            "peak_vms": self.peak_vms,
            "makespan_s": round(self.makespan, 1),
            "wall_s": round(self.wall_seconds, 2),
            "outcomes": dict(self.outcomes),
        }


class _Meter(dict[str, TangoMachine]):
    """The sim world's live VMs, integrating their count over the clock."""

    def __init__(self) -> None:
        super().__init__()
        self.vm_seconds = 0.0
        self.peak = 0
        self._at: float | None = None

    def _tick(self) -> None:
        t = anyio.current_time()
        if self._at is not None:
            self.vm_seconds += len(self) * (t - self._at)
        self._at = t

    def __setitem__(self, key: str, value: TangoMachine) -> None:
        self._tick()
        super().__setitem__(key, value)
        self.peak = max(self.peak, len(self))

    def pop(self, key: str, default: Any = None) -> Any:
        self._tick()
        return super().pop(key, default)

    def __delitem__(self, key: str) -> None:
        self._tick()
        super().__delitem__(key)


def simulate(
    arrivals: Sequence[Arrival],
    candidate: Candidate,
    latencies: Latencies,
    *,
    sample_every: float = 60.0,
    create_concurrency: int | None = None,
    work_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    real_time: bool = False,
    tail: float = 0.0,
) -> Result:
    """Run ``arrivals`` through a manager with ``candidate``'s pools (one per
    image) on the sim driver; returns what every job waited and what the
    VMs cost (``tail``: seconds the pools run on after the last job, to see
    them shrink). ``real_time=True`` runs it on asyncio's real clock instead (for
    checking the virtual clock against it: a few seconds of workload only).
    """
    root = Path(tempfile.mkdtemp(prefix="vmpool-sim-", dir=work_dir or _ram_dir()))
    try:
        box: list[Result] = []

        async def main() -> None:
            box.append(await _run(arrivals, candidate, latencies, root, sample_every,
                                  create_concurrency, progress, tail))

        wall = time.perf_counter()
        if real_time:
            anyio.run(main)
        else:
            run_virtual(main)
        result = box[0]
        result.wall_seconds = time.perf_counter() - wall
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _ram_dir() -> str | None:
    """A RAM file system for the simulation's files, if the host has one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


async def _run(arrivals: Sequence[Arrival], c: Candidate, lat: Latencies, root: Path,
               sample_every: float, create_concurrency: int | None,
               progress: Callable[[int, int], None] | None, tail: float) -> Result:
    from vmpool_drivers.sim import SimVMMS, SimWorld

    world = SimWorld()
    meter = _Meter()
    world.live = meter
    sim = SimVMMS(latency=lat.sim_latency(), world=world, output="")
    specs: dict[int, str] = {}
    (root / "out").mkdir()
    makefile = root / "Makefile"  # (every job has one: the sim driver does not read it)
    makefile.write_text("all:\n")

    def spec_file(duration: float) -> str:
        step = max(1, round(duration / DURATION_STEP))
        path = specs.get(step)
        if path is None:
            path = specs[step] = str(root / f"job-{step}.json")
            Path(path).write_text(json.dumps({"seconds": step * DURATION_STEP}))
        return path

    waits: list[float] = []
    by_lab: dict[str, list[float]] = {}
    outcomes: Counter[str] = Counter()
    busy = 0.0
    ends: list[float] = []
    last_end: dict[str, float] = {}
    at: dict[str, list[tuple[float, float]]] = {}

    def done(h: JobHandle) -> None:
        nonlocal busy
        r = h.result
        assert r is not None
        outcomes[r.outcome.value] += 1
        wait = r.queue_wait
        if wait is not None:
            waits.append(wait)
            by_lab.setdefault(h.job.courselab or "", []).append(wait)
            at.setdefault(h.job.courselab or "", []).append((r.submitted_at, wait))
        busy += r.run_seconds or 0.0
        ends.append(r.finished_at)
        lab = h.job.courselab or ""
        last_end[lab] = max(last_end.get(lab, 0.0), r.finished_at)
        with contextlib.suppress(OSError):
            os.unlink(r.output_file)
        if progress is not None:
            progress(len(ends), len(arrivals))

    longest = max((a.duration for a in arrivals), default=1.0)
    settings = Settings(
        default_vmms="sim", pool_size=c.min_idle, pool_max_size=c.max_size,
        reuse_vms=c.reuse, idle_timeout=c.idle_timeout, output_in_loop=True,
        create_concurrency=create_concurrency or max(1, c.max_size),
        runjob_timeout=longest * 2 + 60, initializevm_timeout=lat.initializeVM * 4 + 60,
        waitvm_timeout=lat.waitVM * 4 + 60, destroy_timeout=lat.destroyVM * 4 + 60,
        max_output_file_size=0, job_retries=2,
    )
    timeline: list[Sample] = []
    images = sorted({a.image for a in arrivals})
    async with Manager(settings, drivers={"sim": sim}, on_done=[done],
                       reconcile=False) as mgr:
        pools = [await mgr.ensure_pool(img, size=c.min_idle, max_size=c.max_size,
                                       reuse=c.reuse, adaptive=c.adaptive, fair=c.fair)
                 for img in images]
        # the warm pools are there before the first job (as a server's are)
        await _all(pools, lambda p: p.status().free >= min(p.idle_target(), p.max_size))
        start = anyio.current_time()
        fed = 0

        def sample() -> None:
            st = [p.status() for p in pools]
            timeline.append(Sample(
                t=anyio.current_time() - start, arrivals=fed,
                waiting=sum(s.waiting for s in st), busy=sum(s.busy for s in st),
                free=sum(s.free for s in st), creating=sum(s.creating for s in st),
                live=len(meter)))

        async def sampler() -> None:
            while True:
                sample()
                await anyio.sleep(sample_every)

        meter.vm_seconds = 0.0  # the bill starts with the workload
        meter._tick()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler)
            for i, a in enumerate(arrivals):
                due = start + a.at
                if due > anyio.current_time():
                    await anyio.sleep_until(due)
                job = make_job(a.image, [(str(makefile), "Makefile"),
                                         (spec_file(a.duration), "sim-job.json")],
                               str(root / "out" / f"{i}.out"), name=f"j{i}", timeout=0)
                job.courselab = a.courselab
                mgr.scheduler.submit(job)
                fed += 1
            await mgr.join()
            if tail > 0:
                await anyio.sleep(tail)
            sample()
            tg.cancel_scope.cancel()
        meter._tick()
        vm_seconds = meter.vm_seconds
        end = max(ends, default=start)
    return Result(
        candidate=c, latencies=lat, jobs=len(arrivals), waits=waits, waits_by_courselab=by_lab,
        outcomes=outcomes, vm_seconds=vm_seconds, busy_seconds=busy, peak_vms=meter.peak,
        makespan=end - start, wall_seconds=0.0, timeline=timeline,
        last_end_by_courselab={k: v - start for k, v in last_end.items()},
        waits_at={k: sorted((t - start, w) for t, w in v) for k, v in at.items()},
    )


async def _all(pools: Sequence[Any], cond: Callable[[Any], bool]) -> None:
    for p in pools:
        await p.wait_until(lambda _st, p=p: cond(p))
