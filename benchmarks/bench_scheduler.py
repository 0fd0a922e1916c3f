"""Scheduler benchmark on the sim driver.

Measures jobs/s and the per-job dispatch overhead — the time from "a VM is
free and the job is queued" to runJob starting — for:

  1. 10,000 jobs, zero-latency driver, pool of 8;
  2. 2,000 jobs, 50 ms runJob, pool of 8 (ideal: 160 jobs/s);
  3. 2,000 jobs, 50 ms runJob, pool of 64 (ideal: 1,280 jobs/s).

Every job goes the whole way: header, waitVM, copyIn, runJob, copyOut and an
atomically written output file; VMs are one-shot (destroyed and replaced
after each job) unless --reuse is given.

    python benchmarks/bench_scheduler.py [--quick] [--reuse] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from common import run_and_report

from vmpool import Manager, Outcome, Settings, make_job
from vmpool.stats import percentile
from vmpool_drivers.sim import SimVMMS


@dataclass
class Scenario:
    name: str
    jobs: int
    pool: int
    run_latency: float

    @property
    def ideal(self) -> float | None:
        return self.pool / self.run_latency if self.run_latency else None



async def timer_floor(sc: Scenario) -> float:
    """jobs/s of ``pool`` bare loops of ``anyio.sleep(runJob latency)``: what the
    event loop's timers allow before any scheduling work (the ideal's real floor)."""
    per_loop = sc.jobs // sc.pool

    async def loop() -> None:
        for _ in range(per_loop):
            await anyio.sleep(sc.run_latency)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(sc.pool):
            tg.start_soon(loop)
    return per_loop * sc.pool / (time.perf_counter() - t0)


async def run_scenario(
    sc: Scenario, reuse: bool, workdir: Path, gc_tuned: bool = False
) -> dict[str, object]:
    sim = SimVMMS(latency={"runJob": sc.run_latency}, seed=1)
    if gc_tuned:
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
    settings = Settings(
        pool_size=sc.pool, reuse_vms=reuse, create_concurrency=sc.pool, default_vmms="sim"
    )
    out = workdir / sc.name
    out.mkdir()
    makefile = workdir.parent / "Makefile"
    async with Manager(settings, drivers={"sim": sim}) as mgr:
        pool = await mgr.ensure_pool("bench.img")
        await pool.wait_until(lambda s: s.free == sc.pool)
        t0 = time.perf_counter()
        handles = [
            await mgr.submit(
                make_job("bench.img", [(str(makefile), "Makefile")], str(out / f"{i}.out"),
                         name=f"b{i}")
            )
            for i in range(sc.jobs)
        ]
        submitted = time.perf_counter() - t0
        await mgr.join()
        elapsed = time.perf_counter() - t0
    results = [h.result for h in handles]
    assert all(r is not None and r.outcome is Outcome.SUCCESS for r in results)
    overheads = [r.dispatch_overhead for r in results if r and r.dispatch_overhead is not None]
    assert sim.live == {}
    rate = sc.jobs / elapsed
    floor = await timer_floor(sc) if sc.run_latency else None
    return {
        "scenario": sc.name,
        "jobs": sc.jobs,
        "pool": sc.pool,
        "runJob_s": sc.run_latency,
        "reuse": reuse,
        "gc": "tuned" if gc_tuned else "default",
        "elapsed_s": round(elapsed, 3),
        "submit_s": round(submitted, 3),
        "jobs_per_s": round(rate, 1),
        "ideal_jobs_per_s": sc.ideal,
        "efficiency": round(rate / sc.ideal, 3) if sc.ideal else None,
        "timer_floor_jobs_per_s": round(floor, 1) if floor else None,
        "vs_timer_floor": round(rate / floor, 3) if floor else None,
        "dispatch_p50_ms": round(percentile(overheads, 50) * 1e3, 3),
        "dispatch_p99_ms": round(percentile(overheads, 99) * 1e3, 3),
        "dispatch_mean_ms": round(statistics.fmean(overheads) * 1e3, 3),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    scale = 10 if args.quick else 1
    scenarios = [
        Scenario("zero-latency-pool8", 10_000 // scale, 8, 0.0),
        Scenario("runjob50ms-pool8", 2_000 // scale, 8, 0.05),
        Scenario("runjob50ms-pool64", 2_000 // scale, 64, 0.05),
    ]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        (work / "Makefile").write_text("all:\n\techo hello\n")
        for sc in scenarios:
            for reuse in ([False, True] if args.both else [args.reuse]):
                sub = work / ("reuse" if reuse else "oneshot")
                sub.mkdir(exist_ok=True)
                row = await run_scenario(sc, reuse, sub, args.gc_tuned)
                rows.append(row)
                print(
                    f"{row['scenario']:<20} reuse={reuse!s:<5} {row['jobs']:>6} jobs "
                    f"{row['elapsed_s']:>7.2f} s  {row['jobs_per_s']:>8.1f} jobs/s"
                    + (f" (ideal {row['ideal_jobs_per_s']:.0f}: {row['efficiency']:.0%};"
                       f" timer floor {row['timer_floor_jobs_per_s']:.0f}:"
                       f" {row['vs_timer_floor']:.0%})"
                       if row["ideal_jobs_per_s"] else "")
                    + f"  dispatch p50 {row['dispatch_p50_ms']:.3f} ms"
                    f" p99 {row['dispatch_p99_ms']:.3f} ms",
                    flush=True,
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the jobs")
    ap.add_argument("--reuse", action="store_true", help="reuse VMs instead of one-shot")
    ap.add_argument("--both", action="store_true", help="run one-shot and reuse")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--gc-tuned", action="store_true",
                    help="gc.freeze() before each scenario and a large young-generation "
                    "threshold, as a server process would set; default: Python's defaults")
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                    help="where output files go (default: /dev/shm, a RAM disk, so that the "
                    "disk's file-creation cost is measured apart)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run_and_report(main_async, args)


if __name__ == "__main__":
    main()
