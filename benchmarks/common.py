"""What the benchmark scripts share."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from vmpool.stats import percentile


def run_and_report(
    main_async: Callable[[argparse.Namespace], Awaitable[Any]], args: argparse.Namespace
) -> None:
    """Run a benchmark; with ``--json FILE`` also write its results there."""
    result = anyio.run(main_async, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


def latency_row(mode: str, lat: list[float]) -> dict[str, Any]:
    """One row of a latency table: p50, p99 and mean in milliseconds."""
    return {
        "mode": mode,
        "jobs": len(lat),
        "p50_ms": round(percentile(lat, 50) * 1e3, 1),
        "p99_ms": round(percentile(lat, 99) * 1e3, 1),
        "mean_ms": round(statistics.fmean(lat) * 1e3, 1),
    }
