"""Small statistics helpers shared by the CLI and the benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import anyio


def percentile(values: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def now() -> float:
    """The event loop's clock (seconds): asyncio's is ``time.monotonic``;
    under a virtual clock (trio's MockClock, :mod:`vmpool.load`) it is the
    simulated time, so every deadline, backoff and idle timeout of the pool
    and the scheduler runs in it. Outside an event loop: ``time.monotonic``."""
    try:
        # asyncio's loop first: a C call (this is on every job's path,
        # several times); anyio's own lookup costs ten times more
        return asyncio.get_running_loop().time()
    except RuntimeError:
        pass
    try:
        return anyio.current_time()
    except RuntimeError:  # no async library running (sniffio's error is one)
        return time.monotonic()
