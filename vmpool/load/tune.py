"""Pool-size tuning: simulate a workload under candidate pool settings and
recommend one.

Each candidate (warm size, cap, reuse, adaptive sizing) runs the whole
workload through vmpool's own scheduler (:func:`vmpool.load.simulate.simulate`),
the candidates in parallel processes. The recommendation:

- with a wait target (``p95 <= X s``): the candidate that meets it with the
  fewest VM-hours (ties: the lower wait);
- with a VM-hour budget: the lowest p95 wait within the budget;
- with both: the fewest VM-hours among those meeting both, else the lowest
  wait within the budget;
- none meets them: the one that comes closest (the lowest wait), marked so.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..pool import Adaptive
from .simulate import Candidate, Latencies, Result, simulate
from .workload import Arrival


@dataclass(frozen=True)
class Target:
    """What a course asks for: the ``quantile`` of the wait at most
    ``wait`` seconds, and/or at most ``vm_hours``."""

    wait: float | None = None
    quantile: float = 95.0
    vm_hours: float | None = None

    def met_by(self, r: Result) -> bool:
        return ((self.wait is None or r.wait(self.quantile) <= self.wait)
                and (self.vm_hours is None or r.vm_seconds / 3600 <= self.vm_hours))

    def describe(self) -> str:
        parts = []
        if self.wait is not None:
            parts.append(f"p{self.quantile:g} wait <= {self.wait:g} s")
        if self.vm_hours is not None:
            parts.append(f"<= {self.vm_hours:g} VM-hours")
        return " and ".join(parts) or "lowest wait"


@dataclass
class Tuning:
    target: Target
    results: list[Result]
    recommended: Result
    met: bool
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def ranked(self) -> list[Result]:
        """The recommendation first, then the others best first."""
        rest = sorted((r for r in self.results if r is not self.recommended), key=_key(
            self.target))
        return [self.recommended, *rest]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.describe(),
            "met": self.met,
            "recommended": self.recommended.summary(),
            "candidates": [r.summary() for r in self.ranked()],
            "wall_s": round(self.wall_seconds, 2),
            "latencies": self.recommended.latencies.__dict__,
            "notes": self.notes,
        }


def _key(target: Target) -> Callable[[Result], tuple[float, ...]]:
    q = target.quantile

    def key(r: Result) -> tuple[float, ...]:
        ok = target.met_by(r)
        if target.wait is not None and ok:
            return (0, r.vm_seconds, r.wait(q))
        if target.vm_hours is not None and r.vm_seconds / 3600 <= target.vm_hours:
            return (1, r.wait(q), r.vm_seconds)
        return (2, r.wait(q), r.vm_seconds)

    return key


def choose(results: Sequence[Result], target: Target) -> tuple[Result, bool]:
    """The recommended result, and whether it meets the target."""
    if not results:
        raise ValueError("no candidate was simulated")
    best = min(results, key=_key(target))
    return best, target.met_by(best)


def candidates(
    min_idle: Iterable[int],
    max_size: Iterable[int],
    *,
    reuse: Iterable[bool] = (False,),
    adaptive: Iterable[Adaptive] = (),
    idle_timeout: float = 0.0,
) -> list[Candidate]:
    """The search space: every fixed (min_idle, max_size, reuse) with
    min_idle <= max_size, plus each adaptive policy at every cap and reuse."""
    caps = sorted(set(max_size))
    out = [Candidate(m, cap, r, None, idle_timeout)
           for m, cap, r in itertools.product(sorted(set(min_idle)), caps, reuse) if m <= cap]
    out += [Candidate(a.low, cap, r, a, idle_timeout)
            for a, cap, r in itertools.product(adaptive, caps, reuse) if a.low <= cap]
    return out


def _run_one(args: tuple[Sequence[Arrival], Candidate, Latencies, float]) -> Result:
    arrivals, cand, lat, sample_every = args
    return simulate(arrivals, cand, lat, sample_every=sample_every)


def tune(
    arrivals: Sequence[Arrival],
    latencies: Latencies,
    target: Target,
    space: Sequence[Candidate],
    *,
    workers: int | None = None,
    sample_every: float = 60.0,
    progress: Callable[[Result], None] | None = None,
) -> Tuning:
    """Simulate every candidate of ``space`` (``workers`` processes at
    once: the CPUs by default) and recommend one for ``target``."""
    import time

    if not space:
        raise ValueError("no candidate settings to try")
    t0 = time.perf_counter()
    n = max(1, min(workers or os.cpu_count() or 1, len(space)))
    results: list[Result] = []
    jobs = [(arrivals, c, latencies, sample_every) for c in space]
    if n == 1:
        for job in jobs:
            r = _run_one(job)
            results.append(r)
            if progress is not None:
                progress(r)
    else:
        with concurrent.futures.ProcessPoolExecutor(max_workers=n) as ex:
            for fut in concurrent.futures.as_completed([ex.submit(_run_one, j) for j in jobs]):
                r = fut.result()
                results.append(r)
                if progress is not None:
                    progress(r)
    order = {c: i for i, c in enumerate(space)}
    results.sort(key=lambda r: order[r.candidate])
    best, met = choose(results, target)
    tuning = Tuning(target, results, best, met, time.perf_counter() - t0)
    if not met:
        tuning.notes.append(f"no candidate meets {target.describe()}: the closest is shown; "
                            "widen the search (larger max_size or min_idle)")
    return tuning


def best_fixed(results: Sequence[Result], target: Target) -> Result | None:
    """The recommendation among the fixed-size candidates only."""
    fixed = [r for r in results if r.candidate.adaptive is None]
    return choose(fixed, target)[0] if fixed else None


def ideal_servers(arrivals: Sequence[Arrival]) -> float:
    """The offered load (mean busy VMs): arrival rate x mean duration."""
    if len(arrivals) < 2:
        return 0.0
    span = arrivals[-1].at - arrivals[0].at
    mean = sum(a.duration for a in arrivals) / len(arrivals)
    return (len(arrivals) / span) * mean if span > 0 else math.inf
