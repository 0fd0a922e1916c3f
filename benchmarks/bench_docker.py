"""Docker driver: a trivial job through a warm pool vs. the alternatives.

Latency (one job at a time, submit -> output file in place), p50/p99:

- warm: vmpool's Docker pool (containers started in advance; one exec per
  job; the used container is replaced in the background, and the next job
  starts once the pool is back at its size);
- bare: the minimum by hand on an already started container, in the same
  run: put_archive (Makefile + autodriver) + one exec of the autodriver +
  get_archive of the feedback file;
- exec-true: one exec of `true` (the engine's floor for running anything);
- cold: `docker run --rm` per job (Tango's way): a new container per job,
  files bind-mounted in.

Throughput: N trivial jobs with a pool of 8 vs. the same jobs as cold
`docker run --rm`, 8 at a time.

    DOCKER_HOST=unix:///run/vmpool/docker.sock python benchmarks/bench_docker.py
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import aiodocker
import anyio
from common import latency_row, run_and_report

from autodriver import SOURCE as AUTODRIVER
from vmpool import Manager, Outcome, Settings, make_job
from vmpool_drivers.docker import DockerVMMS

IMAGE = "vmpool/grader:latest"
MAKEFILE = "all:\n\t@echo hello\n"




async def warm(work: Path, n: int) -> list[float]:
    drv = DockerVMMS(owner="bench-warm")
    settings = Settings(default_vmms="docker", pool_size=2)
    lat = []
    async with Manager(settings, drivers={"docker": drv}) as mgr:
        pool = await mgr.ensure_pool(IMAGE)
        for i in range(n):
            await pool.wait_until(lambda s: s.free == 2 and s.destroying == 0)
            t0 = time.perf_counter()
            h = await mgr.submit(make_job(IMAGE, [(str(work / "Makefile"), "Makefile")],
                                          str(work / f"warm-{i}.out"), name="bench"))
            r = await h.wait()
            lat.append(time.perf_counter() - t0)
            assert r.outcome is Outcome.SUCCESS, Path(r.output_file).read_text()
    return lat


def job_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in (
            ("home/autograde/autolab/Makefile", MAKEFILE.encode(), 0o644),
            ("opt/vmpool/autodriver.py", AUTODRIVER.read_bytes(), 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def bare(n: int) -> tuple[list[float], list[float]]:
    """put_archive + exec + get_archive by hand; and exec `true` alone."""
    docker = aiodocker.Docker()
    container = await docker.containers.create(
        {"Image": IMAGE, "Cmd": ["tail", "-f", "/dev/null"],
         "HostConfig": {"Init": True, "NetworkMode": "none"}},
        name=f"vmpool-bench-bare-{os.getpid()}",
    )
    try:
        await container.start()
        data = job_tar()
        lat, true_lat = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            exe = await container.exec(["true"])
            async with exe.start(detach=False) as stream:
                while await stream.read_out() is not None:
                    pass
            await exe.inspect()
            true_lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await container.put_archive("/", data)  # type: ignore[no-untyped-call]
            exe = await container.exec(
                ["python3", "/opt/vmpool/autodriver.py", "-u", "100", "-f", "104857600",
                 "-t", "60", "-o", "1024000", "--user", "autograde",
                 "--output", "/tmp/feedback", "/home/autograde/autolab"])
            async with exe.start(detach=False) as stream:
                while await stream.read_out() is not None:
                    pass
            code = (await exe.inspect())["ExitCode"]
            tar = await container.get_archive("/tmp/feedback")
            member = tar.extractfile("feedback")
            assert code == 0 and member is not None and b"hello" in member.read()
            lat.append(time.perf_counter() - t0)
        return lat, true_lat
    finally:
        await container.delete(force=True)
        await docker.close()


def cold_cmd(work: Path, i: int) -> list[str]:
    d = work / f"cold-{i}"
    d.mkdir(exist_ok=True)
    (d / "Makefile").write_text(MAKEFILE)
    (d / "autodriver.py").write_bytes(AUTODRIVER.read_bytes())
    script = ("mkdir -p /home/autograde/autolab && cp /mnt/Makefile /home/autograde/autolab/ "
              "&& python3 /mnt/autodriver.py -u 100 -f 104857600 -t 60 -o 1024000 "
              "--user autograde /home/autograde/autolab")
    return ["docker", "run", "--rm", "--network", "none", "-v", f"{d}:/mnt:ro", IMAGE,
            "sh", "-c", script]


async def cold(work: Path, n: int) -> list[float]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        r = await anyio.run_process(cold_cmd(work, i), check=True)
        lat.append(time.perf_counter() - t0)
        assert b"hello" in r.stdout
    return lat


async def throughput_pool(work: Path, n: int, reuse: bool) -> float:
    drv = DockerVMMS(owner="bench-tput")
    settings = Settings(default_vmms="docker", pool_size=8, create_concurrency=8,
                        reuse_vms=reuse)
    async with Manager(settings, drivers={"docker": drv}) as mgr:
        pool = await mgr.ensure_pool(IMAGE)
        await pool.wait_until(lambda s: s.free == 8)
        t0 = time.perf_counter()
        hs = [await mgr.submit(make_job(IMAGE, [(str(work / "Makefile"), "Makefile")],
                                        str(work / f"tput-{i}.out"), name="t"))
              for i in range(n)]
        await mgr.join()
        elapsed = time.perf_counter() - t0
        assert all(h.result and h.result.outcome is Outcome.SUCCESS for h in hs)
    return n / elapsed


async def throughput_cold(work: Path, n: int, concurrency: int = 8) -> float:
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            await anyio.run_process(cold_cmd(work, 10_000 + i), check=True)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return n / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-") as tmp:
        work = Path(tmp)
        (work / "Makefile").write_text(MAKEFILE)
        bare_lat, true_lat = await bare(args.jobs)
        rows = [
            latency_row("exec true (engine floor)", true_lat),
            latency_row("bare: put + exec + get by hand", bare_lat),
            latency_row("warm pool (vmpool)", await warm(work, args.jobs)),
            latency_row("cold docker run --rm", await cold(work, args.jobs)),
        ]
        for r in rows:
            print(f"{r['mode']:<34} p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms",
                  flush=True)
        by = {r["mode"]: r for r in rows}
        w = by["warm pool (vmpool)"]["p50_ms"]
        b = by["bare: put + exec + get by hand"]["p50_ms"]
        c = by["cold docker run --rm"]["p50_ms"]
        print(f"warm / bare p50: {w / b:.2f}x (target <= 1.3)   cold / warm p50: {c / w:.2f}x "
              f"(target >= 3)")
        if not args.tput_jobs:
            return {"latency": rows}
        tp1 = await throughput_pool(work, args.tput_jobs, reuse=False)
        tpr = await throughput_pool(work, args.tput_jobs, reuse=True)
        tc = await throughput_cold(work, args.tput_jobs)
        print(f"throughput, {args.tput_jobs} jobs: pool of 8 one-shot {tp1:.1f} jobs/s, "
              f"pool of 8 reused {tpr:.1f} jobs/s; cold docker run (8 at a time) "
              f"{tc:.1f} jobs/s ({tp1 / tc:.1f}x / {tpr / tc:.1f}x)")
        return {"latency": rows, "throughput": {
            "jobs": args.tput_jobs, "pool8_oneshot_jobs_per_s": round(tp1, 2),
            "pool8_reuse_jobs_per_s": round(tpr, 2), "cold8_jobs_per_s": round(tc, 2)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=40, help="jobs per latency measurement")
    ap.add_argument("--tput-jobs", type=int, default=200,
                    help="jobs for the throughput runs (0: skip them)")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    run_and_report(main_async, args)


if __name__ == "__main__":
    main()
