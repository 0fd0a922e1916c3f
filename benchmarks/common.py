"""What the benchmark scripts share."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from vmpool import VMMS, Manager, Outcome, Settings, make_job
from vmpool.stats import percentile


def run_and_report(
    main_async: Callable[[argparse.Namespace], Awaitable[Any]], args: argparse.Namespace
) -> None:
    """Run a benchmark; with ``--json FILE`` also write its results there."""
    result = anyio.run(main_async, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


def latency_row(mode: str, lat: list[float]) -> dict[str, Any]:
    """One row of a latency table: p50, p99 and mean in milliseconds."""
    return {
        "mode": mode,
        "jobs": len(lat),
        "p50_ms": round(percentile(lat, 50) * 1e3, 1),
        "p99_ms": round(percentile(lat, 99) * 1e3, 1),
        "mean_ms": round(statistics.fmean(lat) * 1e3, 1),
    }


async def one_at_a_time(settings: Settings, drv: VMMS, image: str, work: Path,
                        n: int) -> list[float]:
    """Latencies (submit -> output file) of ``n`` jobs run one at a time
    through a pool of ``settings.pool_size`` on ``drv``: each waits for the
    pool to be warm again, as a quiet server's next job does. Two more run
    first, not counted: they warm the image's caches. ``work`` holds the
    Makefile."""
    vmms = settings.default_vmms
    lat = []
    async with Manager(settings, drivers={vmms: drv}) as mgr:
        pool = await mgr.ensure_pool(image)
        for i in range(n + 2):
            await pool.wait_until(lambda s: s.free == settings.pool_size)
            job = make_job(image, [(str(work / "Makefile"), "Makefile")],
                           str(work / f"{vmms}-{i}.out"), name=f"l{i}", timeout=20)
            t0 = time.perf_counter()
            h = await mgr.run(job)
            assert h.result is not None and h.result.outcome is Outcome.SUCCESS, h.result
            if i >= 2:
                lat.append(time.perf_counter() - t0)
    return lat
