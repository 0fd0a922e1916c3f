"""What the tuner and the simulator show: a table (rich) and plots
(matplotlib, PNG; drawn without a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .simulate import Result
from .tune import Tuning
from .workload import Arrival, rate_curve


def table(tuning: Tuning, limit: int = 12) -> Any:
    """The recommendation and the runners-up, as a rich Table."""
    from rich.table import Table

    q = tuning.target.quantile
    t = Table(title=f"vmpool tune: {tuning.target.describe()} "
                    f"({len(tuning.results)} settings, {tuning.wall_seconds:.1f} s)")
    for col in ("", "setting", "wait p50", f"wait p{q:g}", "wait p99", "utilisation",
                "VM-hours", "peak VMs", "meets"):
        t.add_column(col, justify="left" if col in ("", "setting") else "right")
    for i, r in enumerate(tuning.ranked()[:limit]):
        mark = "best" if i == 0 else f"{i + 1}"
        t.add_row(mark, r.candidate.label, f"{r.wait(50):.1f} s", f"{r.wait(q):.1f} s",
                  f"{r.wait(99):.1f} s", f"{r.utilisation:.0%}", f"{r.vm_seconds / 3600:.1f}",
                  str(r.peak_vms), "yes" if tuning.target.met_by(r) else "no",
                  style="bold green" if i == 0 and tuning.met else None)
    return t


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sizes(tuning: Tuning, path: str | Path) -> Path:
    """p-quantile wait and VM-hours against the warm size, one line per
    (max_size, reuse) of the fixed candidates; adaptive ones as points."""
    plt = _pyplot()
    q = tuning.target.quantile
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    groups: dict[tuple[int, bool], list[Result]] = {}
    for r in tuning.results:
        if r.candidate.adaptive is None:
            groups.setdefault((r.candidate.max_size, r.candidate.reuse), []).append(r)
    for (cap, reuse), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r.candidate.min_idle)
        label = f"max {cap}" + (", reuse" if reuse else "")
        xs = [r.candidate.min_idle for r in rs]
        ax1.plot(xs, [r.wait(q) for r in rs], marker="o", label=label)
        ax2.plot(xs, [r.vm_seconds / 3600 for r in rs], marker="o", label=label)
    for r in tuning.results:
        if r.candidate.adaptive is not None:
            x = r.candidate.adaptive.low
            ax1.scatter([x], [r.wait(q)], marker="*", s=160, zorder=5,
                        label=r.candidate.label)
            ax2.scatter([x], [r.vm_seconds / 3600], marker="*", s=160, zorder=5,
                        label=r.candidate.label)
    best = tuning.recommended
    bx = best.candidate.adaptive.low if best.candidate.adaptive else best.candidate.min_idle
    ax1.scatter([bx], [best.wait(q)], s=300, facecolors="none", edgecolors="red", zorder=6,
                label="recommended")
    if tuning.target.wait is not None:
        ax1.axhline(tuning.target.wait, color="red", linestyle="--", linewidth=1,
                    label=f"target {tuning.target.wait:g} s")
    if tuning.target.vm_hours is not None:
        ax2.axhline(tuning.target.vm_hours, color="red", linestyle="--", linewidth=1,
                    label="budget")
    ax1.set_ylabel(f"p{q:g} queue wait (s)")
    ax1.set_yscale("symlog", linthresh=1.0)
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("VM-hours")
    ax2.set_xlabel("warm VMs (min_idle; adaptive: its floor)")
    ax1.legend(fontsize=7, loc="upper right")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ax1.set_title("Wait and cost against the pool's warm size")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_timeline(result: Result, arrivals: Sequence[Arrival], path: str | Path,
                  title: str | None = None) -> Path:
    """Jobs waiting and busy/idle VMs over time for one result, against the
    arrival curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    tl = result.timeline
    hours = [s.t / 3600 for s in tl]
    ax.plot(hours, [s.busy for s in tl], label="busy VMs", color="tab:blue")
    ax.plot(hours, [s.free for s in tl], label="idle (warm) VMs", color="tab:green")
    ax.plot(hours, [s.creating for s in tl], label="VMs being made", color="tab:olive",
            linewidth=0.8)
    ax.plot(hours, [s.waiting for s in tl], label="jobs waiting", color="tab:red")
    ax.set_xlabel("hours")
    ax.set_ylabel("VMs / jobs")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    span = max((a.at for a in arrivals), default=0.0)
    bin_s = max(60.0, span / 120)
    curve = rate_curve(arrivals, bin_s)
    ax2.fill_between([t / 3600 for t, _ in curve], [r * 60 for _, r in curve], step="post",
                     alpha=0.15, color="gray", label="arrivals / min")
    ax2.set_ylabel("arrivals per minute")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title(title or f"{result.candidate.label}: p95 wait {result.wait(95):.1f} s, "
                          f"{result.vm_seconds / 3600:.1f} VM-hours")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_fair(fair: Result, fifo: Result, arrivals: Sequence[Arrival], path: str | Path,
              courselabs: Sequence[str]) -> Path:
    """Each courselab's waits by submission time, fair line against FIFO."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, res, name in ((axes[0], fifo, "FIFO (Tango's way)"),
                          (axes[1], fair, "fair share between courselabs")):
        for lab in courselabs:
            points = res.waits_at.get(lab, [])
            ax.plot([t / 60 for t, _ in points], [w for _, w in points], ".",
                    markersize=4 if len(points) < 200 else 2,
                    label=f"{lab}: {len(points)} jobs, p95 wait {res.wait(95, lab):.0f} s")
        ax.set_title(name)
        ax.set_xlabel("submitted at (minutes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("queue wait (s)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
