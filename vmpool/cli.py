"""The ``vmpool`` command line.

    vmpool run JOBDIR [JOBDIR ...] [--driver NAME] [--image IMAGE] [--timeout S]
                      [--repeat N] [--pool-size N] [--output-dir DIR]
    vmpool drivers

``run`` starts a warm pool, runs each job folder (every file in it is copied
into the VM; one must be the Makefile) through it, and prints the output
file (one job) or a summary (several, with a progress bar).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from .config import Settings
from .errors import JobError, UnknownDriverError, VMPoolError
from .manager import Manager, make_job
from .registry import available_drivers
from .scheduler import JobHandle, JobResult, Outcome
from .stats import percentile

DEFAULT_DRIVER = "local"
DEFAULT_IMAGES = {"sim": "sim.img", "local": "default"}


def job_files(jobdir: Path) -> list[tuple[str, str]]:
    """Every regular file of ``jobdir`` (recursively) as (localFile, destFile)."""
    files = []
    for path in sorted(jobdir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files.append((str(path), str(path.relative_to(jobdir))))
    return files


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.outcomes: Counter[str] = Counter()
        self.enabled = enabled
        self.t0 = time.monotonic()

    def update(self, h: JobHandle) -> None:
        self.done += 1
        if h.result is not None:
            self.outcomes[h.result.outcome.value] += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        detail = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{rate:6.1f} jobs/s {detail}"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def run_jobs(args: argparse.Namespace) -> int:
    driver = args.driver
    image = args.image or DEFAULT_IMAGES.get(driver, "default")
    jobdirs = [Path(d) for d in args.jobdirs]
    problems = []
    for d in jobdirs:
        if not d.is_dir():
            problems.append(f"{d}: not a directory")
        elif not (d / "Makefile").is_file():
            problems.append(f"{d}: has no Makefile")
    if problems:
        for p in problems:
            print(f"vmpool: {p}", file=sys.stderr)
        return 2
    jobs = [d for d in jobdirs for _ in range(args.repeat)]
    pool_size = args.pool_size or min(len(jobs), 4)
    out_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="vmpool-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env(default_vmms=driver, pool_size=pool_size)
    many = len(jobs) > 1
    progress = Progress(len(jobs), enabled=many and (sys.stderr.isatty() or args.progress))
    try:
        async with Manager(settings, on_done=[progress.update]) as mgr:
            pool = await mgr.ensure_pool(image)
            info(f"warming a pool of {pool_size} VM(s) of {image} on the {driver} driver")
            t0 = time.monotonic()
            with anyio.fail_after(settings.initializevm_timeout + settings.waitvm_timeout):
                st = await pool.wait_until(
                    lambda s: s.free >= pool_size or s.consecutive_failures >= 3
                )
            if st.free < pool_size:
                info(f"the pool cannot make VMs: {st.last_error}")
                return 1
            info(f"pool warm in {time.monotonic() - t0:.2f} s; running {len(jobs)} job(s)")
            handles = []
            progress.t0 = time.monotonic()
            for i, d in enumerate(jobs):
                name = d.resolve().name
                job = make_job(
                    image,
                    job_files(d),
                    str(out_dir / f"{name}-{i + 1}.out"),
                    name=name,
                    timeout=args.timeout,
                    max_output=args.max_output,
                )
                handles.append(await mgr.submit(job))
            t1 = time.monotonic()
            await mgr.join()
            elapsed = time.monotonic() - t1
    except JobError as e:
        print(f"vmpool: job rejected: {e}", file=sys.stderr)
        return 2
    except (UnknownDriverError, VMPoolError) as e:
        print(f"vmpool: {e}", file=sys.stderr)
        return 2
    if args.trace:
        write_run_trace(args.trace, image, handles)
    return report(args, [h.result for h in handles], elapsed, out_dir)


def write_run_trace(path: str, image: str, handles: list[Any]) -> None:
    """The jobs of this run as a trace CSV (vmpool tune --trace replays it)."""
    from .load.workload import trace_from_rows, write_trace

    rows = []
    for h in handles:
        r = h.result
        run = r.run_seconds if r is not None else None
        if r is not None and run is not None and run > 0:
            rows.append((r.submitted_at, image, h.job.name, run, r.outcome.value))
    write_trace(path, trace_from_rows(rows))
    info(f"trace of {len(rows)} jobs: {path}")


# Control characters but newline and tab, C1 controls, and the bidirectional
# overrides: what a job's output could use to rewrite the terminal (erase a
# line, move the cursor, reorder text) and forge a status line.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\r``)."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def report(
    args: argparse.Namespace, results: list[JobResult | None], elapsed: float, out_dir: Path
) -> int:
    """Print what the jobs did; the exit code is 0 when every job succeeded."""
    if args.json:
        print(json.dumps([r.to_dict() for r in results if r], indent=2))
    elif len(results) == 1 and results[0] is not None:
        text = Path(results[0].output_file).read_bytes().decode(errors="backslashreplace")
        sys.stdout.write(text if args.raw else escape_controls(text))
    else:
        n = len(results)
        counts = Counter(r.outcome.value for r in results if r)
        lat = sorted(r.finished_at - r.submitted_at for r in results if r)
        print(f"{n} jobs in {elapsed:.2f} s ({n / max(elapsed, 1e-9):.1f} jobs/s)")
        print("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        print(f"latency p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
        print(f"output files in {out_dir}")
    ok = all(r is not None and r.outcome is Outcome.SUCCESS for r in results)
    return 0 if ok else 1



def info(msg: str) -> None:
    print(f"vmpool: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vmpool", description="Warm VM pools for autograding.")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run job folders through a warm pool")
    run.add_argument("jobdirs", nargs="+", metavar="JOBDIR",
                     help="a folder with a Makefile; every file in it is copied in")
    run.add_argument("--driver", default=os.environ.get("VMPOOL_DRIVER", DEFAULT_DRIVER),
                     help=f"VMMS driver (default {DEFAULT_DRIVER}; known: "
                     f"{', '.join(available_drivers())})")
    run.add_argument("--image", help="image the VMs are made from")
    run.add_argument("--timeout", type=float, default=0,
                     help="job timeout in seconds (0: the default, 60)")
    run.add_argument("--max-output", type=int, default=0,
                     help="output cap in bytes (0: the default, 1000 KiB)")
    run.add_argument("--repeat", type=int, default=1, help="run each folder N times")
    run.add_argument("--pool-size", type=int, default=0,
                     help="warm VMs (default: number of jobs, at most 4)")
    run.add_argument("--output-dir", help="where output files go (default: a new temp dir)")
    run.add_argument("--json", action="store_true", help="print results as JSON")
    run.add_argument("--raw", action="store_true",
                     help="print the job's output as it is (control characters and all; "
                     "by default they are shown escaped, so a job cannot rewrite the screen)")
    run.add_argument("--progress", action="store_true",
                     help="show the progress bar even when stderr is not a terminal")
    run.add_argument("--trace", help="also write the jobs as a trace CSV (for vmpool tune)")

    sub.add_parser("drivers", help="list the drivers installed")

    serve = sub.add_parser("serve", help="run the Tango-compatible HTTP server")
    serve.add_argument("--config", help="TOML configuration file (see vmpool.server.config)")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--host", help="override server.host (the address to listen on)")
    hosts = sub.add_parser(
        "hosts", help="show a running server's hosts, or drain one (many-host drivers)")
    hosts.add_argument("action", nargs="?", choices=["list", "drain", "undrain"],
                       default="list")
    hosts.add_argument("host", nargs="?", help="the host to drain or put back")
    hosts.add_argument("--server", default=os.environ.get("VMPOOL_SERVER",
                                                          "http://127.0.0.1:3000"),
                       help="the server's URL (default $VMPOOL_SERVER or "
                       "http://127.0.0.1:3000)")
    hosts.add_argument("--key", default=os.environ.get("VMPOOL_KEY"),
                       help="an access key of the server (default $VMPOOL_KEY)")
    from .load.cli import add_parsers

    add_parsers(sub)
    return ap


def run_hosts(args: argparse.Namespace) -> int:
    """``vmpool hosts``: the server's /hosts routes, printed as a table."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    if not args.key:
        print("vmpool hosts: give the server's key (--key or $VMPOOL_KEY)", file=sys.stderr)
        return 2
    key = urllib.parse.quote(args.key, safe="")
    if args.action == "list":
        req = urllib.request.Request(f"{args.server.rstrip('/')}/hosts/{key}")
    elif not args.host:
        print(f"vmpool hosts {args.action}: name the host", file=sys.stderr)
        return 2
    else:
        host = urllib.parse.quote(args.host, safe="")
        req = urllib.request.Request(
            f"{args.server.rstrip('/')}/hosts/{key}/{host}/{args.action}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"vmpool hosts: {args.server}: {e}", file=sys.stderr)
        return 1
    if body.get("statusId") != 0:
        print(f"vmpool hosts: {body.get('statusMsg')}", file=sys.stderr)
        return 1
    if args.action != "list":
        print(body.get("statusMsg"))
    for driver, found in (body.get("hosts") or {}).items():
        for name, h in found.items():
            print(f"{driver:<12} {name:<20} {h.get('state', '?'):<9} vms {h.get('vms', 0):>3} "
                  f"room {h.get('room', 0):>3}  {h.get('error') or ''}")
    return 0


def run_server(args: argparse.Namespace) -> int:
    from .server import serve
    from .server.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        if args.port is not None:
            config.port = args.port
        if args.host is not None:
            config.host = args.host
        config.validate()
    except ConfigError as e:
        print(f"vmpool serve: bad configuration: {e}", file=sys.stderr)
        return 2

    def ready(port: int) -> None:
        info(f"serving Tango's REST API on http://{config.host}:{port}/ "
             f"(courselabs {config.courselabs}, jobs in {config.database})")

    async def main() -> None:
        stop = anyio.Event()

        async def on_signal() -> None:
            import signal

            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    info("stopping: running jobs will run again at the next start")
                    stop.set()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_signal)
            await serve(config, ready=ready, stop=stop)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    except (VMPoolError, OSError) as e:  # a driver's check, the port taken, ...
        print(f"vmpool serve: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        matched, rest = group.split((VMPoolError, OSError))
        if matched is None or rest is not None:
            raise
        for leaf in _leaves(matched):
            print(f"vmpool serve: {leaf}", file=sys.stderr)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "drivers":
        for name in available_drivers():
            print(name)
        sys.exit(0)
    if args.command == "serve":
        sys.exit(run_server(args))
    if args.command == "hosts":
        sys.exit(run_hosts(args))
    if args.command in ("tune", "simulate", "workload", "trace", "bench"):
        from .load import cli as load_cli

        run = {"tune": load_cli.run_tune, "simulate": load_cli.run_simulate,
               "workload": load_cli.run_workload, "trace": load_cli.run_trace,
               "bench": load_cli.run_bench}[args.command]
        sys.exit(run(args))
    if args.repeat < 1:
        print("vmpool: --repeat must be >= 1", file=sys.stderr)
        sys.exit(2)
    code: Any = anyio.run(run_jobs, args)
    sys.exit(code)


if __name__ == "__main__":
    main()
