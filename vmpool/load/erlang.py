"""Queueing formulas the pool-size tuner is checked against.

The model is M/M/c: Poisson arrivals at ``lam`` jobs/s, ``c`` VMs (servers),
exponential service at ``mu`` jobs/s per VM (mean duration ``1/mu``), one
FIFO queue. ``a = lam / mu`` is the offered load in Erlangs; the queue is
stable only when ``a < c``. Waits are the time in the queue, before a VM
starts the job (service time not included).
"""

from __future__ import annotations

import math

__all__ = [
    "erlang_b",
    "erlang_c",
    "mdc_mean_wait",
    "mmc_mean_wait",
    "mmc_wait_cdf",
    "mmc_wait_quantile",
    "servers_for_wait",
]


def _check(c: int, lam: float, mu: float) -> None:
    if c < 1:
        raise ValueError(f"c (servers) must be >= 1, not {c!r}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam (arrivals/s) must be a finite number >= 0, not {lam!r}")
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu (services/s per server) must be a finite number > 0, not {mu!r}")


def _b_next(b: float, k: int, a: float) -> float:
    """Erlang B for ``k`` servers from Erlang B for ``k - 1``."""
    return a * b / (k + a * b)


def _c_from_b(b: float, c: int, a: float) -> float:
    """Erlang C from Erlang B for the same ``c`` (requires ``a < c``)."""
    return c * b / (c - a * (1.0 - b))


def erlang_b(c: int, a: float) -> float:
    """Erlang B: the blocking probability of M/M/c/c with offered load ``a``
    Erlangs, by the recursion ``B(k) = a B(k-1) / (k + a B(k-1))`` (stable for
    any ``c``; no factorials)."""
    if c < 0:
        raise ValueError(f"c (servers) must be >= 0, not {c!r}")
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"a (offered load) must be a finite number >= 0, not {a!r}")
    b = 1.0
    for k in range(1, c + 1):
        b = _b_next(b, k, a)
    return b


def erlang_c(c: int, lam: float, mu: float) -> float:
    """Erlang C: the probability that an arrival has to wait in M/M/c.
    1.0 when the queue is not stable (``lam / mu >= c``). Computed from
    Erlang B, ``C = c B / (c - a (1 - B))``."""
    _check(c, lam, mu)
    a = lam / mu
    if a >= c:
        return 1.0
    if a == 0:
        return 0.0
    return _c_from_b(erlang_b(c, a), c, a)


def mmc_wait_cdf(t: float, c: int, lam: float, mu: float) -> float:
    """``P(W <= t) = 1 - C exp(-(c mu - lam) t)`` for the wait W in the queue
    of M/M/c; 0 for ``t < 0`` and, when the queue is not stable, for every
    ``t`` (the wait grows without bound)."""
    _check(c, lam, mu)
    if t < 0 or lam / mu >= c:
        return 0.0
    return 1.0 - erlang_c(c, lam, mu) * math.exp(-(c * mu - lam) * t)


def mmc_wait_quantile(q: float, c: int, lam: float, mu: float) -> float:
    """The ``q``-quantile of the wait in M/M/c: the smallest ``t`` with
    ``P(W <= t) >= q``. 0 when ``q <= 1 - C`` (that share of the jobs does
    not wait at all); ``inf`` for ``q = 1`` or an unstable queue."""
    _check(c, lam, mu)
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], not {q!r}")
    if lam / mu >= c:
        return math.inf
    waits = erlang_c(c, lam, mu)
    if q <= 1.0 - waits:
        return 0.0
    if q >= 1.0:
        return math.inf
    return math.log(waits / (1.0 - q)) / (c * mu - lam)


def mmc_mean_wait(c: int, lam: float, mu: float) -> float:
    """The mean wait in the queue of M/M/c, ``C / (c mu - lam)``; ``inf``
    when not stable."""
    _check(c, lam, mu)
    if lam / mu >= c:
        return math.inf
    return erlang_c(c, lam, mu) / (c * mu - lam)


def mdc_mean_wait(c: int, lam: float, d: float) -> float:
    """The mean wait in the queue of M/D/c (every job runs ``d`` seconds),
    by the Lee-Longton approximation for M/G/c (Allen-Cunneen's with Poisson
    arrivals): the M/M/c mean wait times ``(1 + cv^2) / 2``, where cv, the
    coefficient of variation of the service time, is 0 -- half the M/M/c
    wait. Exact for ``c = 1`` (Pollaczek-Khinchine); for ``c > 1`` it is a
    little low, most at low utilization (Cosmetatos's correction factor is
    above 1: e.g. about 15 % low at c=5, rho=0.5; 3 % at rho=0.8). ``inf``
    when not stable."""
    if not (math.isfinite(d) and d > 0):
        raise ValueError(f"d (service time) must be a finite number > 0, not {d!r}")
    return 0.5 * mmc_mean_wait(c, lam, 1.0 / d)  # (1 + cv^2) / 2 with cv = 0


def servers_for_wait(
    lam: float, mu: float, target_wait: float, q: float = 0.95, max_c: int = 10000
) -> int:
    """The smallest number of servers ``c`` with the ``q``-quantile of the
    M/M/c wait at most ``target_wait`` seconds (0 when there are no arrivals).
    The quantile only falls as ``c`` grows, so this walks up from the first
    stable ``c``, carrying Erlang B along (linear in the answer). ValueError
    if even ``max_c`` servers are not enough."""
    _check(1, lam, mu)
    if not (target_wait >= 0):
        raise ValueError(f"target_wait must be >= 0, not {target_wait!r}")
    if not 0 <= q < 1:
        raise ValueError(f"q must be in [0, 1), not {q!r}")
    if lam == 0:
        return 0
    a = lam / mu
    b = 1.0
    for c in range(1, max_c + 1):
        b = _b_next(b, c, a)
        if a >= c:
            continue
        waits = _c_from_b(b, c, a)
        if q <= 1.0 - waits:
            return c
        if math.log(waits / (1.0 - q)) / (c * mu - lam) <= target_wait:
            return c
    raise ValueError(
        f"more than max_c={max_c} servers needed for a {q:.0%} wait of at most "
        f"{target_wait} s at {lam} jobs/s with {1 / mu} s jobs (offered load {a:.1f})"
    )
