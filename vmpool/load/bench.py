"""``vmpool bench``: a load benchmark against any configured driver, and
``--calibrate``: what the driver's calls take, for the simulator.

The benchmark warms a pool, submits N trivial jobs at once and reports
jobs/s, end-to-end latency (submission to output file) and queue wait
(p50/p99), dispatch overhead (a VM free and the job queued -> runJob) and
the rate VMs were made at. The calibration times each VMMS call of the
driver (``initializeVM``, ``waitVM``, ``copyIn``, ``copyOut``,
``destroyVM``) on a few VMs and writes their medians as a
:class:`~vmpool.load.simulate.Latencies` file that ``vmpool tune
--latencies`` reads.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from ..config import Settings
from ..manager import Manager, make_job
from ..models import InputFile
from ..stats import percentile
from ..vmms import VMMS
from .simulate import Latencies

HELLO = "all:\n\t@echo hello from vmpool bench\n"


async def bench(settings: Settings, driver: str, image: str, jobs: int, pool: int,
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """N trivial jobs through a warm pool of ``pool`` VMs of ``driver``."""
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        work = Path(tmp)
        (work / "Makefile").write_text(HELLO)
        s = replace(settings, default_vmms=driver, pool_size=pool,
                    pool_max_size=max(pool, settings.pool_max_size),
                    create_concurrency=max(pool, settings.create_concurrency))
        async with Manager(s) as mgr:
            p = await mgr.ensure_pool(image)
            t0 = time.perf_counter()
            with anyio.fail_after(s.initializevm_timeout + s.waitvm_timeout):
                await p.wait_until(lambda st: st.free >= pool or st.consecutive_failures >= 3)
            if p.status().free < pool:
                raise RuntimeError(f"the pool cannot make VMs: {p.status().last_error}")
            warm = time.perf_counter() - t0
            handles = []
            t1 = time.perf_counter()
            for i in range(jobs):
                job = make_job(image, [InputFile(str(work / "Makefile"), "Makefile")],
                               str(work / f"{i}.out"), name=f"bench{i}", timeout=60)
                handles.append(await mgr.submit(job))
            for done, h in enumerate(handles, 1):
                await h.wait()
                if progress is not None:
                    progress(done)
            elapsed = time.perf_counter() - t1
    results = [h.result for h in handles if h.result is not None]
    ok = [r for r in results if r.outcome.value == "success"]
    latency = [r.finished_at - r.submitted_at for r in results]
    waits = [r.queue_wait for r in results if r.queue_wait is not None]
    overhead = [r.dispatch_overhead for r in results if r.dispatch_overhead is not None]
    vms = len(results) + sum(r.retries for r in results)  # one-shot: a VM per try
    reuse = s.reuse_vms
    return {
        "driver": driver, "image": image, "jobs": jobs, "pool": pool, "reuse": reuse,
        "succeeded": len(ok), "warm_s": round(warm, 3), "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 2) if elapsed else None,
        "latency_p50_ms": round(percentile(latency, 50) * 1e3, 1),
        "latency_p99_ms": round(percentile(latency, 99) * 1e3, 1),
        "queue_wait_p50_ms": round(percentile(waits, 50) * 1e3, 1),
        "queue_wait_p99_ms": round(percentile(waits, 99) * 1e3, 1),
        "dispatch_overhead_p50_ms": round(percentile(overhead, 50) * 1e3, 2),
        "vms_made_per_s": None if reuse else round(vms / elapsed, 2),
        "_latencies": latency,
    }


async def calibrate(drv: VMMS, image: str, samples: int = 5) -> Latencies:
    """Each VMMS call of ``drv``, timed on ``samples`` VMs: their medians."""
    from ..models import TangoMachine, pool_name

    times: dict[str, list[float]] = {k: [] for k in ("initializeVM", "waitVM", "copyIn",
                                                     "copyOut", "destroyVM")}
    with tempfile.TemporaryDirectory(prefix="vmpool-calibrate-") as tmp:
        mk = Path(tmp) / "Makefile"
        mk.write_text(HELLO)
        for i in range(samples):
            vm = TangoMachine(name=pool_name(image), image=image, vmms=drv.driver_name,
                              id=900_000 + i)
            try:
                t = time.perf_counter()
                await drv.initializeVM(vm)
                times["initializeVM"].append(time.perf_counter() - t)
                t = time.perf_counter()
                with anyio.fail_after(300):
                    await drv.waitVM(vm, 300)
                times["waitVM"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await drv.copyIn(vm, [InputFile(str(mk), "Makefile")])
                times["copyIn"].append(time.perf_counter() - t)
                await drv.runJob(vm, 30, 0, True)
                t = time.perf_counter()
                await drv.copyOut(vm, str(Path(tmp) / f"{i}.out"))
                times["copyOut"].append(time.perf_counter() - t)
            finally:
                t = time.perf_counter()
                with anyio.CancelScope(shield=True), anyio.fail_after(300):
                    await drv.destroyVM(vm)
                times["destroyVM"].append(time.perf_counter() - t)
    med = {k: round(statistics.median(v), 4) if v else 0.0 for k, v in times.items()}
    return Latencies(**med, source=f"calibrated: {drv.driver_name} {image}, {samples} VMs, "
                                   f"{time.strftime('%Y-%m-%d %H:%M')}")
