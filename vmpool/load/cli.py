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
