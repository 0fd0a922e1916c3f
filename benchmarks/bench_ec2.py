"""EC2 driver: a job on a warm instance vs. the autodriver run by hand over
asyncssh, and warming a pool of 16 at once vs. one after another.

In one run, against moto in server mode and a real sshd per instance
(tests/ec2_world.py: each instance a container of the grading image on
127.0.0.1):

- overhead per job on a warm instance (submit -> output file in place),
  p50/p99: the EC2 driver through a pool of 1 that reuses its instance,
  against a bare asyncssh script on one open connection that does the
  same work by hand (send the job's tar, run the autodriver, read its
  output, write the output file) — the least any SSH driver can do;
- the time until a pool of 16 is warm: created 16 at once
  (create_concurrency 16) vs. one after another (create_concurrency 1,
  Tango's ec2SSH way), with moto answering at once and, with
  ``--api-delay``, with every RunInstances delayed as a real API's is.

    DOCKER_HOST=unix:///run/vmpool/docker.sock python benchmarks/bench_ec2.py
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh
from common import latency_row, one_at_a_time, run_and_report

from autodriver import SOURCE as AUTODRIVER
from autodriver import arguments
from vmpool import Manager, Settings
from vmpool.models import TangoMachine
from vmpool_drivers.ec2 import EC2VMMS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.ec2_world import EC2World, FaultProxy, MotoServer, driver_options  # noqa: E402

IMAGE = "grader"


def settings(pool: int, **kw: Any) -> Settings:
    return Settings(default_vmms="ec2", pool_size=pool, waitvm_timeout=60,
                    initializevm_timeout=120, destroy_timeout=60, **kw)


async def driver_latency(world: EC2World, ami: str, work: Path, n: int) -> list[float]:
    """``n`` jobs one at a time on one warm instance (the pool reuses it)."""
    drv = EC2VMMS(**driver_options(world, ami))
    return await one_at_a_time(settings(1, reuse_vms=True), drv, IMAGE, work, n)


async def by_hand_latency(world: EC2World, ami: str, work: Path, n: int) -> list[float]:
    """The same jobs by hand: one instance, one open asyncssh connection,
    one channel per job that unpacks the tar and runs the autodriver."""
    drv = EC2VMMS(**driver_options(world, ami))
    vm = TangoMachine(name=IMAGE, image=IMAGE, id=1)
    await drv.initializeVM(vm)
    try:
        await drv.waitVM(vm, 60)  # (the instance booted; its key is pinned)
        inst = {"InstanceId": vm.instance_id}
        host, port = await world.resolve(inst)
        pinned = asyncssh.import_public_key(vm.driver_data["host_key"])
        makefile = (work / "Makefile").read_bytes()
        program = AUTODRIVER.read_bytes()
        run = ["python3", "-S", "-E", "/opt/vmpool/autodriver.py", *arguments(
            timeout=20, max_output=1_000_000, nproc=100, fsize=100 << 20,
            user="autograde", job_dir="/home/autograde/autolab")]
        script = ("find /home/autograde -mindepth 1 -delete; mkdir -p /home/autograde/autolab"
                  " && tar -x -m -o -f - -C / && exec " + " ".join(map(shlex.quote, run)))
        lat = []
        async with asyncssh.connect(host, port, username="root",
                                    client_keys=[str(world.key_file)],
                                    known_hosts=([pinned], [], []), config=None,
                                    agent_path=None) as conn:
            for i in range(n + 2):
                t0 = time.perf_counter()
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    for name, data, mode in (("opt/vmpool/autodriver.py", program, 0o755),
                                             ("home/autograde/autolab/Makefile", makefile,
                                              0o644)):
                        info = tarfile.TarInfo(name)
                        info.size, info.mode = len(data), mode
                        tar.addfile(info, io.BytesIO(data))
                result = await conn.run(script, input=buf.getvalue(), encoding=None)
                assert result.exit_status == 0, result.stderr
                assert isinstance(result.stdout, bytes)
                (work / f"hand-{i}.out").write_bytes(result.stdout)
                if i >= 2:
                    lat.append(time.perf_counter() - t0)
        return lat
    finally:
        await drv.destroyVM(vm)
        await drv.close()


async def warm_time(world: EC2World, ami: str, url: str, concurrency: int) -> float:
    drv = EC2VMMS(**driver_options(world, ami, url=url, max_instances=16))
    async with Manager(settings(16, create_concurrency=concurrency),
                       drivers={"ec2": drv}) as mgr:
        await mgr.driver("ec2")
        t0 = time.perf_counter()
        pool = await mgr.ensure_pool(IMAGE)
        await pool.wait_until(lambda s: s.free == 16)
        return time.perf_counter() - t0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    docker_host = os.environ.get("DOCKER_HOST", "unix:///run/vmpool/docker.sock")
    moto = MotoServer()
    root = Path(tempfile.mkdtemp(prefix="vmpool-bench-ec2-"))
    world = EC2World.create(moto, docker_host, root)
    try:
        ami = moto.register_ami(IMAGE)
        work = root / "work"
        work.mkdir()
        (work / "Makefile").write_text("all:\n\t@echo hello\n")
        rows = [latency_row("ec2 driver (warm instance)",
                            await driver_latency(world, ami, work, args.jobs)),
                latency_row("asyncssh by hand", await by_hand_latency(world, ami, work,
                                                                      args.jobs))]
        for r in rows:
            print(f"{r['mode']:<28} {r['jobs']:>4} jobs  p50 {r['p50_ms']:7.1f} ms  "
                  f"p99 {r['p99_ms']:7.1f} ms  mean {r['mean_ms']:7.1f} ms", flush=True)
        ratio = rows[0]["p50_ms"] / rows[1]["p50_ms"]
        ratio99 = rows[0]["p99_ms"] / rows[1]["p99_ms"]
        print(f"warm-job overhead, driver / by hand: p50 {ratio:.2f}x, p99 {ratio99:.2f}x "
              "(target <= 1.2x)", flush=True)
        await world.sync()
        warm: dict[str, dict[str, float]] = {}
        for delay in sorted({0.0, args.api_delay}):
            with FaultProxy(moto.url) as proxy:
                proxy.delay("RunInstances", delay)
                t_par = await warm_time(world, ami, proxy.url, 16)
                await world.sync()
                t_seq = await warm_time(world, ami, proxy.url, 1)
                await world.sync()
            warm[f"{delay:g}"] = {"concurrent_s": round(t_par, 2),
                                  "sequential_s": round(t_seq, 2),
                                  "ratio": round(t_par / t_seq, 3)}
            print(f"pool of 16 warm (RunInstances delay {delay:g} s): at once {t_par:.2f} s, "
                  f"one after another {t_seq:.2f} s ({t_par / t_seq:.2f}x)", flush=True)
    finally:
        world.close()
        moto.stop()
    return {"latency": rows, "p50_ratio": round(ratio, 3), "p99_ratio": round(ratio99, 3),
            "warm16": warm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=30, help="latency jobs per mode")
    ap.add_argument("--api-delay", type=float, default=1.0,
                    help="seconds each RunInstances is delayed in the second warm-up row")
    ap.add_argument("--json", help="write the results to this file")
    run_and_report(main_async, ap.parse_args())


if __name__ == "__main__":
    main()
