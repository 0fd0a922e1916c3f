"""SSH Docker driver: a trivial job through SSH hosts vs. the local Docker driver.

In one run, on the one engine (every "host" is a real sshd on 127.0.0.1 in
front of it, tests/sshd.py):

- latency, one job at a time (submit -> output file in place), p50/p99:
  the Docker driver on the local socket, and the SSH Docker driver with one
  host (the same engine through one SSH connection);
- throughput: N trivial jobs on a pool of 6, one local engine vs. 3 SSH
  hosts (2 VMs each);
- Tango's distDocker way, for comparison: one ``ssh host docker exec`` round
  trip (an ssh process and a docker CLI process per step of a job).

    DOCKER_HOST=unix:///run/vmpool/docker.sock python benchmarks/bench_ssh_docker.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiodocker
import anyio
from common import latency_row, one_at_a_time, run_and_report

from vmpool import Manager, Outcome, Settings, make_job
from vmpool.stats import percentile
from vmpool.vmms import VMMS
from vmpool_drivers.docker import DockerVMMS
from vmpool_drivers.ssh_docker import SSHDockerVMMS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.sshd import USER, SSHHosts, share_docker_socket  # noqa: E402

IMAGE = "vmpool/grader:latest"
UID_BASE = 70000


def settings(vmms: str, pool: int) -> Settings:
    return Settings(default_vmms=vmms, pool_size=pool, waitvm_timeout=30,
                    initializevm_timeout=60, destroy_timeout=30)


async def latency(vmms: str, drv: VMMS, work: Path, n: int) -> list[float]:
    """One job at a time through a warm pool of 1 (one-shot VMs)."""
    return await one_at_a_time(settings(vmms, 1), drv, IMAGE, work, n)


async def throughput(vmms: str, drv: VMMS, work: Path, n: int) -> float:
    async with Manager(settings(vmms, 6), drivers={vmms: drv}) as mgr:
        pool = await mgr.ensure_pool(IMAGE)
        await pool.wait_until(lambda s: s.free == 6)
        t0 = time.perf_counter()
        handles = [await mgr.submit(make_job(
            IMAGE, [(str(work / "Makefile"), "Makefile")], str(work / f"{vmms}-t{i}.out"),
            name=f"t{i}", timeout=20)) for i in range(n)]
        await mgr.join()
        elapsed = time.perf_counter() - t0
    assert all(h.result is not None and h.result.outcome is Outcome.SUCCESS for h in handles)
    return n / elapsed


async def ssh_docker_exec(hosts: SSHHosts, docker_host: str, n: int) -> list[float]:
    """Tango's distDocker step: ``ssh host docker exec CONTAINER true``, timed."""
    h = hosts.hosts[0]
    async with aiodocker.Docker(url=docker_host) as docker:
        c = await docker.containers.run(
            {"Image": IMAGE, "Cmd": ["tail", "-f", "/dev/null"],
             "Labels": {"vmpool.bench": "1"}, "HostConfig": {"NetworkMode": "none"}},
            name=f"vmpool-bench-{uuid.uuid4().hex[:8]}")
        try:
            cmd = ["ssh", "-i", str(hosts.client_key), "-p", str(h.port),
                   "-o", f"UserKnownHostsFile={hosts.known_hosts}", "-o", "BatchMode=yes",
                   f"{USER}@127.0.0.1", "docker", "-H", docker_host, "exec", c.id, "true"]
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                await anyio.run_process(cmd, check=True)
                times.append(time.perf_counter() - t0)
        finally:
            await c.delete(force=True)
    return times


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    docker_host = os.environ.get("DOCKER_HOST", "unix:///run/vmpool/docker.sock")
    hosts = SSHHosts(Path(tempfile.mkdtemp(prefix="vmpool-sshd-")), 3,
                     share_docker_socket(docker_host))
    hosts.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "Makefile").write_text("all:\n\t@echo hello\n")

            def local() -> DockerVMMS:
                return DockerVMMS(url=docker_host, uid_base=UID_BASE, uid_count=200)

            def ssh(n_hosts: int) -> SSHDockerVMMS:
                specs = [hosts.spec(h, max_vms=6) for h in hosts.hosts[:n_hosts]]
                return SSHDockerVMMS(hosts=specs, uid_base=UID_BASE, uid_count=200)

            rows = [latency_row("docker (local socket)",
                                await latency("docker", local(), work, args.jobs)),
                    latency_row("ssh_docker (1 host)",
                                await latency("ssh_docker", ssh(1), work, args.jobs))]
            for r in rows:
                print(f"{r['mode']:<24} {r['jobs']:>4} jobs  p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  mean {r['mean_ms']:7.1f} ms", flush=True)
            ratio = rows[1]["p50_ms"] / rows[0]["p50_ms"]
            print(f"warm-job p50 through SSH / local: {ratio:.2f}x", flush=True)
            t_local = await throughput("docker", local(), work, args.many)
            t_ssh = await throughput("ssh_docker", ssh(3), work, args.many)
            print(f"throughput, {args.many} jobs, pool of 6: local engine {t_local:.1f} jobs/s, "
                  f"3 SSH hosts {t_ssh:.1f} jobs/s ({t_ssh / t_local:.2f}x)", flush=True)
            exec_rt = await ssh_docker_exec(hosts, docker_host, 20)
            p50 = percentile(exec_rt, 50) * 1e3
            print(f"distDocker step (ssh host docker exec true): p50 {p50:.0f} ms, "
                  f"mean {statistics.fmean(exec_rt) * 1e3:.0f} ms", flush=True)
    finally:
        hosts.stop()
    return {"latency": rows, "p50_ratio": round(ratio, 3),
            "throughput": {"local": round(t_local, 1), "ssh_3_hosts": round(t_ssh, 1)},
            "ssh_docker_exec_p50_ms": round(p50, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=30, help="latency jobs per driver")
    ap.add_argument("--many", type=int, default=200, help="throughput jobs")
    ap.add_argument("--json", help="write the results to this file")
    run_and_report(main_async, ap.parse_args())


if __name__ == "__main__":
    main()
