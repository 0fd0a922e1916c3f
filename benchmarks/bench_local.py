"""Local driver: end-to-end latency of a trivial job, warm pool vs. cold.

- warm: a pool keeps sandboxes ready; each job only runs (copyIn, the
  autodriver in bubblewrap, copyOut) and its sandbox is replaced afterwards,
  in the background;
- cold: no warm sandbox (pool size 0): each job waits for its sandbox to be
  created and checked (initializeVM + waitVM), as a Tango without
  preallocation does;
- bare: the same autodriver run started by hand in the same bubblewrap
  sandbox, one process per job, no pool and no scheduler: the floor.

Jobs run one at a time (latency, not throughput): submit -> output file in
place. Run as root (the local driver hands out uids).

    python benchmarks/bench_local.py [--jobs 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
from common import latency_row, run_and_report

from vmpool import Manager, Outcome, Settings, make_job
from vmpool_drivers.local import LocalVMMS


async def through_pool(work: Path, jobs: int, size: int) -> list[float]:
    drv = LocalVMMS(owner=f"bench-{size}", state_dir=str(work / f"state-{size}"))
    settings = Settings(default_vmms="local", pool_size=size, pool_max_size=max(size, 1))
    makefile = work / "Makefile"
    lat = []
    async with Manager(settings, drivers={"local": drv}) as mgr:
        pool = await mgr.ensure_pool("default")
        await pool.wait_until(lambda s: s.free == size)
        for i in range(jobs):
            if size:
                await pool.wait_until(lambda s: s.free == size and s.destroying == 0)
            t0 = time.perf_counter()
            h = await mgr.submit(
                make_job("default", [(str(makefile), "Makefile")],
                         str(work / f"out-{size}-{i}"), name="bench")
            )
            r = await h.wait()
            lat.append(time.perf_counter() - t0)
            assert r.outcome is Outcome.SUCCESS, Path(r.output_file).read_text()
    return lat


async def bare(work: Path, jobs: int) -> list[float]:
    """The autodriver in a bubblewrap sandbox by hand: the cost of one run."""
    drv = LocalVMMS(owner="bench-bare", state_dir=str(work / "state-bare"))
    from vmpool import TangoMachine

    vm = TangoMachine(name="default", image="default", id=1)
    await drv.initializeVM(vm)
    await drv.waitVM(vm, 30)
    job = Path(vm.driver_data["job"])
    argv = [drv.python, "/run/vmpool/autodriver.py", "-u", "100", "-f", "104857600", "-t", "60",
            "-o", "1024000", "--user", "autograde", "--output", "/run/vmpool/out/feedback",
            "--no-cgroup", "/home/autograde/autolab"]
    cmd = drv._wrap(vm, drv._sandbox_cmd(vm, argv, True), "none")
    lat = []
    try:
        for _ in range(jobs):
            (job / "Makefile").write_bytes((work / "Makefile").read_bytes())
            t0 = time.perf_counter()
            await anyio.run_process(cmd, check=True, stdout=subprocess.DEVNULL)
            out = (Path(vm.driver_data["dir"]) / "out" / "feedback").read_text()
            lat.append(time.perf_counter() - t0)
            assert "Job exited with status 0" in out
    finally:
        await drv.destroyVM(vm)
    return lat


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        work = Path(tmp)
        (work / "Makefile").write_text("all:\n\t@echo hello\n")
        for name, coro in (
            ("bare (bwrap + autodriver by hand)", bare(work, args.jobs)),
            ("warm pool (size 2)", through_pool(work, args.jobs, 2)),
            ("cold (pool size 0)", through_pool(work, args.jobs, 0)),
        ):
            r = latency_row(name, await coro)
            rows.append(r)
            print(f"{name:<36} p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms  "
                  f"({r['jobs']} jobs)", flush=True)
    bare_p50, warm_p50, cold_p50 = (float(r["p50_ms"]) for r in rows)
    print(f"warm / bare p50: {warm_p50 / bare_p50:.2f}x; cold / warm p50: "
          f"{cold_p50 / warm_p50:.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    run_and_report(main_async, args)


if __name__ == "__main__":
    main()
