"""HTTP server benchmark: the Tango REST API under load, on the sim driver.

The server runs in this process (``vmpool.server.serve`` on this process's
event loop, as ``vmpool serve`` runs it); the clients run in a separate
process (this script with ``--client``), so that the load generator's work
is not counted as the server's (on a 2-core machine they still share the
CPUs). Three phases, each with a fresh server, store and courselab folder:

0. *serial*: as *load* below, with 200 addJob requests from one client, one
   at a time: the latency of one addJob on an otherwise idle server.
1. *load*: sim driver with runJob 50 ms (everything else 0 ms), a warm pool
   of 16 one-shot VMs; ``--clients`` concurrent aiohttp clients (one
   session, one connection each) send ``--jobs`` addJob requests as fast as
   they are answered. Reported: addJob requests/s and latency p50/p99,
   end-to-end jobs/s (first addJob sent to the last output file present;
   the client watches the output folder every 2 ms), and GET / latency
   from a probe every 10 ms during the run.
3. *open*: a lab with ``--handins`` files of 1 MiB, uploaded over HTTP;
   then ``GET /open`` five times: its latency (Autolab calls it before every
   upload; Tango reads every file of the lab each time).
2. *prealloc*: sim driver whose initializeVM takes 0.5 s; ``POST
   /prealloc/<key>/<image>/16`` on a cold server, while the probe sends GET /
   every 10 ms until the pool has 16 free VMs. Reported: the prealloc
   answer's latency, the time until 16 VMs are free, GET / latency p50/p99/max
   meanwhile.

Tango's numbers (tango-compat.md section 7, measured on this project's
machines) are printed beside them for context: ~4 ms of server time per
addJob; 4.7 jobs/s with a 50 ms runJob and a pool of 8; pool creation
synchronous, 8 VMs in 8 s during which GET / got no answer.

    python benchmarks/bench_server.py [--jobs 1000] [--clients 32] [--handins 2000]
                                      [--dir DIR] [--json FILE] [--before REV]

``--before REV`` runs the same phases on a git worktree of an earlier
revision too (the same script, that revision's vmpool), and reports the two
side by side.

The store and output files go to a temporary folder on disk by default (the
SQLite commit of each accepted job is part of what addJob costs); ``--dir``
puts them elsewhere (e.g. /dev/shm).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from vmpool import Settings
from vmpool.server import serve
from vmpool.stats import percentile

try:
    from vmpool.server.config import ServerConfig
except ImportError:  # a revision from before the server package (--before)
    from vmpool.serverconfig import ServerConfig  # type: ignore[no-redef]

KEY = "bench"
LAB = "lab"
IMAGE = "img.img"
POOL = 16
RUNJOB = 0.05
INIT = 0.5
PROBE_EVERY = 0.01
SERIAL_JOBS = 200
MAKEFILE = b"all:\n\t@echo hello\n"

TANGO = {
    "addjob_ms": 4.0,
    "addjob_per_s": 250.0,
    "jobs_per_s": 4.7,
    "jobs_per_s_note": "runJob 50 ms, pool of 8",
    "prealloc_note": "8 VMs created synchronously in 8 s; GET / unanswered meanwhile",
    "prealloc_get_max_s": 8.0,
}


# --------------------------------------------------------------------------
# The clients (a separate process)


class Probe:
    """GET / every ``PROBE_EVERY`` seconds (one request at a time), latencies kept."""

    def __init__(self, http: Any, base: str) -> None:
        self.http = http
        self.base = base
        self.latencies: list[float] = []
        self.failures = 0

    async def run(self, stop: anyio.Event) -> None:
        import aiohttp

        start = time.perf_counter()
        n = 0
        while not stop.is_set():
            t = time.perf_counter()
            try:
                async with self.http.get(self.base + "/") as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                self.latencies.append(time.perf_counter() - t)
            else:
                self.failures += 1
            n += 1
            # the next probe at its slot (or at once, if this one overran it)
            await anyio.sleep(max(0.0, start + n * PROBE_EVERY - time.perf_counter()))


def stats_ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50) * 1e3, 3),
        "p99_ms": round(percentile(values, 99) * 1e3, 3),
        "max_ms": round(max(values, default=float("nan")) * 1e3, 3),
    }


async def client_load(port: int, jobs: int, clients: int, outdir: Path) -> dict[str, Any]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=clients + 2)
    async with aiohttp.ClientSession(connector=connector) as http:
        await setup_lab(http, base)
        async with http.post(f"{base}/prealloc/{KEY}/{IMAGE}/{POOL}") as r:
            assert (await r.json())["statusId"] == 0
        await wait_free(http, base, POOL, limit=30)

        latencies: list[float] = []
        failed: list[str] = []
        next_job = iter(range(jobs))

        async def worker() -> None:
            for i in next_job:
                body = {
                    "image": IMAGE, "jobName": f"job{i}", "output_file": f"job{i}.out",
                    "files": [{"localFile": "Makefile", "destFile": "Makefile"}],
                    "timeout": 20,
                }
                t = time.perf_counter()
                async with http.post(f"{base}/addJob/{KEY}/{LAB}/", json=body) as r:
                    answer = await r.json()
                latencies.append(time.perf_counter() - t)
                if answer.get("statusId") != 0:
                    failed.append(str(answer))

        stop = anyio.Event()
        probe = Probe(http, base)
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe.run, stop)
            t_first = time.perf_counter()
            async with anyio.create_task_group() as workers:
                for _ in range(clients):
                    workers.start_soon(worker)
            t_added = time.perf_counter()
            while count_outputs(outdir) < jobs - len(failed):
                if time.perf_counter() - t_added > 120:
                    raise TimeoutError("the jobs did not finish within 120 s")
                await anyio.sleep(0.002)
            t_done = time.perf_counter()
            stop.set()
    return {
        "jobs": jobs,
        "clients": clients,
        "addjob_failed": len(failed),
        "addjob_failures": failed[:5],
        "addjob_seconds": round(t_added - t_first, 4),
        "addjob_per_s": round(jobs / (t_added - t_first), 1),
        "addjob_latency": stats_ms(latencies),
        "end_to_end_seconds": round(t_done - t_first, 4),
        "jobs_per_s": round((jobs - len(failed)) / (t_done - t_first), 1),
        "ideal_jobs_per_s": POOL / RUNJOB,
        "get_during_load": stats_ms(probe.latencies),
        "get_failures": probe.failures,
    }


async def client_prealloc(port: int) -> dict[str, Any]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        await setup_lab(http, base)
        # a moment of probes before, for the baseline
        stop_before = anyio.Event()
        before = Probe(http, base)
        async with anyio.create_task_group() as tg:
            tg.start_soon(before.run, stop_before)
            await anyio.sleep(0.3)
            stop_before.set()
        stop = anyio.Event()
        probe = Probe(http, base)
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe.run, stop)
            t0 = time.perf_counter()
            async with http.post(f"{base}/prealloc/{KEY}/{IMAGE}/{POOL}") as r:
                answer = await r.json()
            t_answer = time.perf_counter()
            assert answer["statusId"] == 0, answer
            await wait_free(http, base, POOL, limit=60)
            t_full = time.perf_counter()
            stop.set()
    return {
        "vms": POOL,
        "initializevm_s": INIT,
        "prealloc_answer_ms": round((t_answer - t0) * 1e3, 3),
        "pool_full_s": round(t_full - t0, 3),
        "get_before": stats_ms(before.latencies),
        "get_during_prealloc": stats_ms(probe.latencies),
        "get_failures": probe.failures,
    }


async def setup_lab(http: Any, base: str) -> None:
    async with http.get(f"{base}/open/{KEY}/{LAB}/") as r:
        assert (await r.json())["statusId"] == 0
    async with http.post(f"{base}/upload/{KEY}/{LAB}/", data=MAKEFILE,
                         headers={"Filename": "Makefile"}) as r:
        assert (await r.json())["statusId"] == 0


async def wait_free(http: Any, base: str, n: int, limit: float) -> None:
    deadline = time.perf_counter() + limit
    while True:
        async with http.get(f"{base}/pool/{KEY}/{IMAGE}") as r:
            answer = await r.json()
        pools = answer.get("pools") or {}
        if any(len(p["free"]) >= n for p in pools.values()):
            return
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the pool did not reach {n} free VMs within {limit} s: {answer}")
        await anyio.sleep(0.01)


async def client_open(port: int, handins: int) -> dict[str, Any]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    blob = os.urandom(1 << 20)
    async with aiohttp.ClientSession() as http:
        await setup_lab(http, base)
        t0 = time.perf_counter()
        for i in range(handins):
            data = i.to_bytes(4, "big") + blob[4:]
            async with http.post(f"{base}/upload/{KEY}/{LAB}/", data=data,
                                 headers={"Filename": f"handin{i}.c"}) as r:
                assert (await r.json())["statusId"] == 0
        t_up = time.perf_counter()
        latencies = []
        for _ in range(5):
            t = time.perf_counter()
            async with http.get(f"{base}/open/{KEY}/{LAB}/") as r:
                answer = await r.json()
            latencies.append(time.perf_counter() - t)
            assert len(answer["files"]) == handins + 1
    return {"handins": handins, "upload_s": round(t_up - t0, 2), "open": stats_ms(latencies)}


def count_outputs(outdir: Path) -> int:
    try:
        with os.scandir(outdir) as it:
            return sum(1 for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def client_main(args: argparse.Namespace) -> None:
    if args.client == "load":
        result = anyio.run(client_load, args.port, args.jobs, args.clients, Path(args.outdir))
    elif args.client == "serial":
        result = anyio.run(client_load, args.port, SERIAL_JOBS, 1, Path(args.outdir))
    elif args.client == "open":
        result = anyio.run(client_open, args.port, args.handins)
    else:
        result = anyio.run(client_prealloc, args.port)
    print(json.dumps(result))


# --------------------------------------------------------------------------
# The server (this process)


def server_config(root: Path, latency: dict[str, float], pool_size: int) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        keys=[KEY],
        courselabs=str(root / "labs"),
        database=str(root / "jobs.sqlite"),
        settings=Settings(
            default_vmms="sim",
            pool_size=pool_size,
            driver_options={"sim": {"latency": latency, "images": [IMAGE]}},
        ),
    )


async def run_phase(root: Path, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    if phase in ("load", "serial"):
        config = server_config(root, {"runJob": RUNJOB}, POOL)
    else:
        config = server_config(root, {"initializeVM": INIT}, 0)
    stop = anyio.Event()
    ready = anyio.Event()
    port: list[int] = []

    def on_ready(p: int) -> None:
        port.append(p)
        ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(config, ready=on_ready, stop=stop))
        with anyio.fail_after(30):
            await ready.wait()
        cmd = [sys.executable, __file__, "--client", phase, "--port", str(port[0]),
               "--jobs", str(args.jobs), "--clients", str(args.clients),
               "--handins", str(args.handins),
               "--outdir", str(Path(config.courselabs) / f"{KEY}-{LAB}" / "output")]
        try:
            done = await anyio.run_process(cmd, check=False)
        finally:
            stop.set()
    if done.returncode != 0:
        raise RuntimeError(f"the {phase} client failed:\n{done.stderr.decode()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def server_main(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.dir) if args.dir else None
    root = Path(tempfile.mkdtemp(prefix="vmpool-bench-server-", dir=base))
    try:
        serial = await run_phase(root / "serial", "serial", args)
        load = await run_phase(root / "load", "load", args)
        prealloc = await run_phase(root / "prealloc", "prealloc", args)
        opened = await run_phase(root / "open", "open", args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "dir": str(root.parent),
        "cpus": os.cpu_count(),
        "clients_process": "separate",
        "serial": serial,
        "load": load,
        "prealloc": prealloc,
        "open": opened,
        "tango": TANGO,
    }


def report(r: dict[str, Any]) -> None:
    load, pre, t = r["load"], r["prealloc"], r["tango"]
    lat, gl = load["addjob_latency"], load["get_during_load"]
    one = r["serial"]["addjob_latency"]
    gb, gp = pre["get_before"], pre["get_during_prealloc"]
    rows = [
        ("addJob requests/s", f"{load['addjob_per_s']:,.0f}",
         f"~{t['addjob_per_s']:.0f} ({t['addjob_ms']:.0f} ms each)"),
        (f"addJob latency p50 / p99, {load['clients']} clients",
         f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} ms", "-"),
        (f"addJob latency p50 / p99, 1 client ({one['n']} jobs)",
         f"{one['p50_ms']:.2f} / {one['p99_ms']:.2f} ms", f"~{t['addjob_ms']:.0f} ms"),
        (f"end-to-end jobs/s (ideal {load['ideal_jobs_per_s']:.0f})",
         f"{load['jobs_per_s']:,.1f} ({load['jobs_per_s'] / load['ideal_jobs_per_s']:.0%})",
         f"{t['jobs_per_s']} ({t['jobs_per_s_note']})"),
        ("GET / during the load p50 / p99 / max",
         f"{gl['p50_ms']:.1f} / {gl['p99_ms']:.1f} / {gl['max_ms']:.1f} ms", "-"),
        (f"prealloc {pre['vms']} (initializeVM {pre['initializevm_s']} s): answer",
         f"{pre['prealloc_answer_ms']:.1f} ms", "after the whole pool (8 VMs: 8 s)"),
        (f"  {pre['vms']} VMs free after", f"{pre['pool_full_s']:.2f} s", "8 VMs: 8 s"),
        ("  GET / meanwhile p50 / p99 / max",
         f"{gp['p50_ms']:.1f} / {gp['p99_ms']:.1f} / {gp['max_ms']:.1f} ms",
         f"no answer for {t['prealloc_get_max_s']:.0f} s"),
        ("  GET / before (idle) p50 / p99",
         f"{gb['p50_ms']:.1f} / {gb['p99_ms']:.1f} ms", "-"),
    ]
    if "open" in r:
        o = r["open"]
        rows.append((f"open, a lab of {o['handins']:,} handins of 1 MiB, p50 / max",
                     f"{o['open']['p50_ms']:.1f} / {o['open']['max_ms']:.1f} ms",
                     "reads every file each time"))
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    print(f"vmpool HTTP server, sim driver: {load['jobs']} addJob from {load['clients']} "
          f"concurrent clients (separate process), pool {POOL}, runJob {RUNJOB * 1e3:.0f} ms; "
          f"store and outputs in {r['dir']}; {r['cpus']} CPUs")
    print(f"{'':{w0}}  {'vmpool':>{w1}}  Tango (tango-compat.md section 7)")
    for a, b, c in rows:
        print(f"{a:{w0}}  {b:>{w1}}  {c}")
    problems = []
    if load["addjob_failed"]:
        problems.append(f"{load['addjob_failed']} addJob refused: {load['addjob_failures']}")
    if load["get_failures"] or pre["get_failures"]:
        problems.append(f"GET / failed {load['get_failures'] + pre['get_failures']} times")
    for p in problems:
        print(f"WARNING: {p}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000, help="addJob requests (default 1000)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--dir", help="where the store and outputs go (default: a temp dir)")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--handins", type=int, default=2000,
                    help="1 MiB files in the lab of the open phase (default 2000)")
    ap.add_argument("--before", help="also run on a git worktree of this revision")
    ap.add_argument("--client", choices=["serial", "load", "prealloc", "open"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.client:
        client_main(args)
        return
    if args.before:
        compare(args)
        return
    result = anyio.run(server_main, args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def compare(args: argparse.Namespace) -> None:
    """The phases on ``--before`` and on this tree, one after the other."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vmpool-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree),
                        args.before], check=True, capture_output=True)
        try:
            for label, path in (("before", tree), ("after", root)):
                out = Path(tmp) / f"{label}.json"
                cmd = [sys.executable, __file__, "--jobs", str(args.jobs), "--clients",
                       str(args.clients), "--handins", str(args.handins), "--json", str(out),
                       *(["--dir", args.dir] if args.dir else [])]
                subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(path)}, check=True,
                               stdout=subprocess.DEVNULL)
                results[label] = json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)],
                           check=False, capture_output=True)
    for label in ("before", "after"):
        print(f"\n== {label} ({args.before if label == 'before' else 'this tree'})")
        report(results[label])
    b, a = results["before"], results["after"]
    print("\nafter / before:")
    for name, get in (
        ("addJob requests/s", lambda r: r["load"]["addjob_per_s"]),
        ("end-to-end jobs/s", lambda r: r["load"]["jobs_per_s"]),
        ("GET / p99 during prealloc (ms)",
         lambda r: r["prealloc"]["get_during_prealloc"]["p99_ms"]),
        ("open p50 (ms)", lambda r: r["open"]["open"]["p50_ms"]),
    ):
        print(f"  {name}: {get(b)} -> {get(a)} ({get(a) / get(b):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
