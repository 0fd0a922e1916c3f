"""Prometheus-style histograms, kept by the scheduler and shown by ``/metrics``.

Small on purpose: one ``observe`` is a bisect and two additions, so it can sit
on every job's path.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: seconds: from a millisecond (a warm hand-over) to ten minutes (a long job)
DEFAULT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)


class Histogram:
    def __init__(self, name: str, help_: str, label: str,
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.name = name
        self.help = help_
        self.label = label
        self.buckets = tuple(buckets)
        #: label value -> (per-bucket counts, sum, count)
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, label_value: str, seconds: float) -> None:
        series = self._series.get(label_value)
        if series is None:
            series = self._series[label_value] = ([0] * (len(self.buckets) + 1), [0.0, 0.0])
        counts, totals = series
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        totals[0] += seconds
        totals[1] += 1

    def count(self, label_value: str) -> int:
        series = self._series.get(label_value)
        return int(series[1][1]) if series else 0

    def render(self, prefix: str = "vmpool_") -> list[str]:
        name = prefix + self.name
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        for value, (counts, (total, n)) in sorted(self._series.items()):
            lab = f'{self.label}="{escape_label_value(value)}"'
            running = 0
            for bound, c in zip(self.buckets, counts, strict=False):
                running += c
                lines.append(f'{name}_bucket{{{lab},le="{bound:g}"}} {running}')
            lines.append(f'{name}_bucket{{{lab},le="+Inf"}} {int(n)}')
            lines.append(f"{name}_sum{{{lab}}} {total:.6f}")
            lines.append(f"{name}_count{{{lab}}} {int(n)}")
        return lines


def escape_label_value(value: str) -> str:
    """A label value in Prometheus' text format: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
