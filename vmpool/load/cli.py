"""``vmpool tune`` and ``vmpool simulate``: the command-line side of
:mod:`vmpool.load`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..pool import Adaptive
from .simulate import Candidate, Latencies, Result, simulate
from .tune import Target, Tuning, best_fixed, candidates, ideal_servers, tune
from .workload import Arrival, parse_workload, read_trace


def _ints(text: str) -> list[int]:
    """``"0,5,10"`` or ``"0-40:5"`` (from 0 to 40 by 5)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            rng, _, step = part.partition(":")
            lo, _, hi = rng.partition("-")
            try:
                a, b, s = int(lo), int(hi), int(step or 1)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad range {part!r} (LO-HI[:STEP])") from None
            if s <= 0 or b < a:
                raise argparse.ArgumentTypeError(f"bad range {part!r} (LO-HI[:STEP])")
            out.extend(range(a, b + 1, s))
        else:
            try:
                out.append(int(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"need numbers >= 0, got {text!r}")
    return out


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("bench", help="a load benchmark against a driver (real VMs)")
    b.add_argument("--driver", default="local", help="the VMMS driver (default local)")
    b.add_argument("--image", help="the image (default: the driver's default)")
    b.add_argument("--jobs", type=int, default=50, help="jobs to run (default 50)")
    b.add_argument("--pool", type=int, default=4, help="warm VMs (default 4)")
    b.add_argument("--reuse", action="store_true", help="reuse VMs between jobs")
    b.add_argument("--config", help="a server TOML file whose [drivers] options to use")
    b.add_argument("--calibrate", metavar="FILE",
                   help="instead: time the driver's calls and write them for vmpool tune")
    b.add_argument("--samples", type=int, default=5, help="VMs timed by --calibrate")
    b.add_argument("--json", help="write the results to this file")
    b.add_argument("--plot", help="write a latency histogram (PNG) here")
    t = sub.add_parser("trace", help="write a server's job history as a trace CSV")
    t.add_argument("--database", required=True, help="the server's job store (jobs.sqlite)")
    t.add_argument("-o", "--output", required=True, help="the trace CSV to write")
    w = sub.add_parser("workload", help="write a generated workload as a trace CSV")
    w.add_argument("spec", help="e.g. 'ramp:total=5000,hours=6,tau=1,durations=lognormal:20-90'")
    w.add_argument("-o", "--output", required=True, help="the trace CSV to write")
    for name, helptext in (
        ("tune", "recommend pool settings for a workload (simulated, fast)"),
        ("simulate", "run a workload through one pool setting (simulated, fast)"),
    ):
        p = sub.add_parser(name, help=helptext)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--workload", help="a generated workload, e.g. "
                         "'ramp:total=3000,hours=6,tau=1,durations=lognormal:20-90' "
                         "(see vmpool.load.workload.parse_workload)")
        src.add_argument("--trace", help="a trace CSV (submit_time,image,courselab,duration,"
                         "outcome), e.g. from 'vmpool trace'")
        p.add_argument("--latencies", help="a calibration file (vmpool bench --calibrate)")
        p.add_argument("--create", type=float, default=25.0,
                       help="seconds to make a VM (initializeVM + waitVM) without "
                       "--latencies (default 25)")
        p.add_argument("--destroy", type=float, default=2.0,
                       help="seconds to destroy one (default 2)")
        p.add_argument("--json", help="write the results to this file")
        p.add_argument("--plot", help="write PNG plots to this directory")
        if name == "tune":
            p.add_argument("--target-wait", type=float,
                           help="the wait (s) the quantile must stay under")
            p.add_argument("--quantile", type=float, default=95.0,
                           help="which quantile of the wait (default 95)")
            p.add_argument("--budget", type=float, help="at most this many VM-hours")
            p.add_argument("--min-idle", type=_ints, default=None,
                           help="warm sizes to try, e.g. 0-100:10 (default: around the "
                           "offered load)")
            p.add_argument("--max-size", type=_ints, default=None,
                           help="caps to try, e.g. 200,400 (default: 2x the peak need)")
            p.add_argument("--reuse", choices=["off", "on", "both"], default="off",
                           help="reuse VMs between jobs (Tango: off)")
            p.add_argument("--adaptive", action="store_true",
                           help="also try adaptive sizing (the warm target follows arrivals)")
            p.add_argument("--workers", type=int, default=None,
                           help="simulations at once (default: the CPUs)")
        else:
            p.add_argument("--min-idle", type=int, default=2, help="warm VMs")
            p.add_argument("--max-size", type=int, default=100, help="the pool's cap")
            p.add_argument("--reuse", action="store_true", help="reuse VMs between jobs")
            p.add_argument("--adaptive", action="store_true", help="adaptive sizing")


def _need(args: argparse.Namespace) -> None:
    """rich (tables, progress) and, for --plot, matplotlib: the load extra."""
    import importlib.util

    missing = [m for m in ("rich", *(["matplotlib"] if getattr(args, "plot", None) else []))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"vmpool {args.command} needs {' and '.join(missing)}: "
                         "pip install 'vmpool[load]'")


def _arrivals(args: argparse.Namespace) -> list[Arrival]:
    try:
        return read_trace(args.trace) if args.trace else parse_workload(args.workload)
    except (OSError, ValueError) as e:
        raise SystemExit(f"vmpool {args.command}: {e}") from None


def _latencies(args: argparse.Namespace) -> Latencies:
    if args.latencies:
        try:
            return Latencies.load(args.latencies)
        except ValueError as e:
            raise SystemExit(f"vmpool {args.command}: {e}") from None
    if args.create < 0 or args.destroy < 0:
        raise SystemExit(f"vmpool {args.command}: --create and --destroy must be >= 0")
    return Latencies(initializeVM=args.create * 0.8, waitVM=args.create * 0.2,
                     destroyVM=args.destroy, source=f"given: create {args.create:g} s")


def adaptive_policies(create: float, caps: list[int]) -> list[Adaptive]:
    """A few adaptive policies to try (margins and holds)."""
    return [Adaptive(low=0, high=max(caps), margin=m, hold=h, create=create, halflife=300)
            for m, h in ((1.0, 120.0), (2.0, 300.0), (3.0, 600.0))]


def run_bench(args: argparse.Namespace) -> int:
    _need(args)
    import anyio

    from ..cli import DEFAULT_IMAGES
    from ..config import Settings
    from ..registry import load_driver
    from .bench import bench, calibrate

    settings = Settings.from_env()
    if args.config:
        from ..server.config import ConfigError, load_config

        try:
            settings = load_config(args.config).settings
        except ConfigError as e:
            raise SystemExit(f"vmpool bench: {e}") from None
    settings = settings.replace(reuse_vms=args.reuse)
    image = args.image or DEFAULT_IMAGES.get(args.driver, "default")
    if args.jobs < 1 or args.pool < 1 or args.samples < 1:
        raise SystemExit("vmpool bench: --jobs, --pool and --samples must be >= 1")
    if args.calibrate:
        async def cal() -> Latencies:
            options = dict(settings.driver_options.get(args.driver, {}))
            drv = load_driver(args.driver, **options)
            try:
                return await calibrate(drv, image, args.samples)
            finally:
                await drv.close()

        lat = anyio.run(cal)
        lat.dump(args.calibrate)
        print(f"wrote {args.calibrate}: create {lat.create:.3f} s (initializeVM "
              f"{lat.initializeVM:.3f} + waitVM {lat.waitVM:.3f}), copyIn {lat.copyIn:.3f}, "
              f"copyOut {lat.copyOut:.3f}, destroyVM {lat.destroyVM:.3f}")
        return 0
    progress, done = _progress(args.jobs, f"{args.driver}: jobs")
    try:
        result = anyio.run(bench, settings, args.driver, image, args.jobs, args.pool,
                           progress)
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"vmpool bench: {e}") from None
    finally:
        done()
    latencies = result.pop("_latencies")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vmpool bench: {args.jobs} jobs on {args.driver} ({image}), "
                        f"pool {args.pool}{', reuse' if args.reuse else ''}")
    for col in ("jobs/s", "latency p50", "latency p99", "queue p50", "queue p99",
                "dispatch p50", "VMs made/s"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['jobs_per_s']}", f"{result['latency_p50_ms']} ms",
                  f"{result['latency_p99_ms']} ms", f"{result['queue_wait_p50_ms']} ms",
                  f"{result['queue_wait_p99_ms']} ms",
                  f"{result['dispatch_overhead_p50_ms']} ms",
                  "-" if result["vms_made_per_s"] is None else f"{result['vms_made_per_s']}")
    Console().print(table)
    if result["succeeded"] != args.jobs:
        print(f"only {result['succeeded']} of {args.jobs} jobs succeeded", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        from .report import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist([x * 1e3 for x in latencies], bins=30)
        ax.set_xlabel("end-to-end latency (ms)")
        ax.set_ylabel("jobs")
        ax.set_title(table.title)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return 0 if result["succeeded"] == args.jobs else 1


def run_trace(args: argparse.Namespace) -> int:
    from ..server.store import SQLiteStore
    from .workload import trace_from_rows, write_trace

    if not Path(args.database).is_file():
        raise SystemExit(f"vmpool trace: no database {args.database}")
    store = SQLiteStore(args.database)
    try:
        rows = store.trace_rows()
    finally:
        store.close()
    write_trace(args.output, trace_from_rows(rows))
    print(f"wrote {args.output}: {len(rows)} jobs")
    return 0


def run_workload(args: argparse.Namespace) -> int:
    from .workload import write_trace

    try:
        arrivals = parse_workload(args.spec)
    except ValueError as e:
        raise SystemExit(f"vmpool workload: {e}") from None
    write_trace(args.output, arrivals)
    span = arrivals[-1].at / 3600 if arrivals else 0.0
    print(f"wrote {args.output}: {len(arrivals)} jobs over {span:.2f} h")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    _need(args)
    arrivals = _arrivals(args)
    lat = _latencies(args)
    adaptive = (Adaptive(low=args.min_idle, high=args.max_size, create=lat.create)
                if args.adaptive else None)
    cand = Candidate(args.min_idle, args.max_size, args.reuse, adaptive)
    progress, done = _progress(len(arrivals), "simulating")
    try:
        r = simulate(arrivals, cand, lat, progress=lambda n, total: progress(n))
    finally:
        done()
    summary = r.summary()
    for k, v in summary.items():
        print(f"{k:>12}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        from .report import plot_timeline

        Path(args.plot).mkdir(parents=True, exist_ok=True)
        print(f"wrote {plot_timeline(r, arrivals, Path(args.plot) / 'timeline.png')}")
    return 0


def _progress(total: int, what: str) -> tuple[Any, Any]:
    """A rich progress bar on stderr: (advance-to(n), stop())."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(file=sys.stderr), transient=False)
    task = bar.add_task(what, total=total)
    bar.start()
    return (lambda n: bar.update(task, completed=n)), bar.stop


def run_tune(args: argparse.Namespace) -> int:
    _need(args)
    from rich.console import Console

    arrivals = _arrivals(args)
    if not arrivals:
        raise SystemExit("vmpool tune: the workload has no jobs")
    lat = _latencies(args)
    if args.target_wait is None and args.budget is None:
        raise SystemExit("vmpool tune: give a target: --target-wait SECONDS and/or --budget "
                         "VM-HOURS")
    target = Target(wait=args.target_wait, quantile=args.quantile, vm_hours=args.budget)
    load = ideal_servers(arrivals)
    peak = _peak_load(arrivals)
    min_idle = args.min_idle or sorted({0, *(int(load * f) for f in (0.25, 0.5, 1, 1.5, 2))})
    max_size = args.max_size or [max(10, int(peak * 1.5)), max(20, int(peak * 3))]
    reuse = {"off": [False], "on": [True], "both": [False, True]}[args.reuse]
    space = candidates(min_idle, max_size, reuse=reuse,
                       adaptive=adaptive_policies(lat.create, max_size) if args.adaptive else ())
    err = Console(file=sys.stderr)
    err.print(f"{len(arrivals)} jobs over {arrivals[-1].at / 3600:.2f} h, mean load "
              f"{load:.1f} VMs busy, peak {peak:.0f}; VM creation {lat.create:g} s "
              f"({lat.source}); {len(space)} settings to try")
    progress, done = _progress(len(space), "simulating settings")
    count = 0

    def step(_: Result) -> None:
        nonlocal count
        count += 1
        progress(count)

    try:
        tuning = tune(arrivals, lat, target, space, workers=args.workers, progress=step)
    finally:
        done()
    _report(tuning, arrivals, args)
    return 0


def _peak_load(arrivals: list[Arrival]) -> float:
    """The busiest 10 minutes' offered load (busy VMs)."""
    from .workload import rate_curve

    if not arrivals:
        return 0.0
    mean = sum(a.duration for a in arrivals) / len(arrivals)
    return max((r for _, r in rate_curve(arrivals, 600.0)), default=0.0) * mean


def _report(tuning: Tuning, arrivals: list[Arrival], args: argparse.Namespace) -> None:
    from rich.console import Console

    from .report import plot_sizes, plot_timeline, table

    out = Console(width=max(Console().width, 120))
    out.print(table(tuning))
    best = tuning.recommended
    c = best.candidate
    verdict = "meets" if tuning.met else "does NOT meet"
    out.print(f"recommended: [bold]{c.label}[/bold] ({verdict} {tuning.target.describe()}): "
              f"p{tuning.target.quantile:g} wait {best.wait(tuning.target.quantile):.1f} s, "
              f"{best.vm_seconds / 3600:.1f} VM-hours, utilisation {best.utilisation:.0%}")
    fixed = best_fixed(tuning.results, tuning.target)
    if c.adaptive is not None and fixed is not None:
        out.print(f"best fixed size: {fixed.candidate.label}: p95 {fixed.wait(95):.1f} s, "
                  f"{fixed.vm_seconds / 3600:.1f} VM-hours")
    for note in tuning.notes:
        out.print(f"[yellow]note:[/yellow] {note}")
    data = tuning.to_dict()
    if args.plot:
        d = Path(args.plot)
        d.mkdir(parents=True, exist_ok=True)
        data["plots"] = [str(plot_sizes(tuning, d / "sizes.png")),
                         str(plot_timeline(best, arrivals, d / "timeline.png"))]
        if fixed is not None and fixed is not best:
            data["plots"].append(str(plot_timeline(fixed, arrivals, d / "timeline-fixed.png")))
        out.print("plots: " + ", ".join(data["plots"]))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        out.print(f"results: {args.json}")
