"""Workloads for the load benchmarks and the pool-size tuner: who submits
which job, when, and for how long it runs.

A workload is a list of :class:`Arrival` sorted by ``at`` (seconds from the
start of the workload). It comes from a generator (:func:`poisson`,
:func:`burst`, :func:`deadline_ramp`, combined with :func:`merge`), from the
CLI's text form (:func:`parse_workload`), or from a trace of real jobs
(:func:`read_trace`, :func:`trace_from_rows`).

Every generator is deterministic for a given ``seed``: the arrival times are
drawn first and the job durations after them, from the one
``random.Random(seed)``, so changing the duration distribution does not move
the arrivals.

Trace files (CSV, UTF-8) have a header row, exactly::

    submit_time,image,courselab,duration,outcome

one row per job after it:

``submit_time``
    when the job was submitted, in seconds (a float). :func:`write_trace`
    writes seconds from the first job (so the first row is 0);
    :func:`read_trace` shifts whatever it reads so the earliest job is at 0,
    so absolute epoch times are accepted too. Never negative.
``image``
    the VM image (the pool) the job ran on; not empty.
``courselab``
    the course/lab the job belongs to (fair share is per courselab); not empty.
``duration``
    seconds the job ran on its VM (runJob), a float > 0.
``outcome``
    how it ended ("success", "timeout", ...), or empty when unknown.

Rows may come in any order (:func:`read_trace` sorts them); blank lines are
skipped.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "TRACE_COLUMNS",
    "Arrival",
    "Constant",
    "Durations",
    "Empirical",
    "LogNormal",
    "Uniform",
    "burst",
    "deadline_ramp",
    "merge",
    "parse_durations",
    "parse_workload",
    "poisson",
    "rate_curve",
    "read_trace",
    "trace_from_rows",
    "write_trace",
]

TRACE_COLUMNS = ("submit_time", "image", "courselab", "duration", "outcome")

# the 95th percentile of the standard normal distribution
_Z95 = statistics.NormalDist().inv_cdf(0.95)


@dataclass(frozen=True, slots=True)
class Arrival:
    """One job of a workload."""

    at: float  # seconds from the start of the workload (>= 0)
    image: str  # the VM image (pool) the job runs on
    courselab: str  # the course/lab it belongs to (fair share is per courselab)
    duration: float  # seconds the job runs on its VM (runJob), > 0
    outcome: str | None = None  # from a trace of real jobs ("success", "timeout", ...)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.at) and self.at >= 0):
            raise ValueError(f"Arrival.at must be a finite number >= 0, not {self.at!r}")
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ValueError(f"Arrival.duration must be a finite number > 0, not {self.duration!r}")
        if not self.image:
            raise ValueError("Arrival.image must not be empty")
        if not self.courselab:
            raise ValueError("Arrival.courselab must not be empty")


# --------------------------------------------------------------------------
# job durations


class Durations(Protocol):
    """A distribution of job durations (seconds, > 0)."""

    def sample(self, rng: random.Random) -> float: ...

    @property
    def mean(self) -> float: ...


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, not {value!r}")


@dataclass(frozen=True, slots=True)
class Constant:
    """Every job runs ``seconds``."""

    seconds: float

    def __post_init__(self) -> None:
        _positive("Constant seconds", self.seconds)

    def sample(self, rng: random.Random) -> float:
        return self.seconds

    @property
    def mean(self) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Log-normal durations: ``log(duration)`` is normal with mean
    ``log(median)`` and standard deviation ``sigma``."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        _positive("LogNormal median", self.median)
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"LogNormal sigma must be a finite number >= 0, not {self.sigma!r}")

    @classmethod
    def from_range(cls, low: float, high: float) -> LogNormal:
        """The log-normal with ``low`` as its 5th and ``high`` as its 95th
        percentile: "most jobs take 20-90 s" is ``from_range(20, 90)``."""
        _positive("LogNormal low", low)
        _positive("LogNormal high", high)
        if low > high:
            raise ValueError(f"LogNormal range: low ({low}) is above high ({high})")
        return cls(math.sqrt(low * high), (math.log(high) - math.log(low)) / (2 * _Z95))

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.median), self.sigma)

    @property
    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Durations uniform on ``[low, high]``."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _positive("Uniform low", self.low)
        _positive("Uniform high", self.high)
        if self.low > self.high:
            raise ValueError(f"Uniform: low ({self.low}) is above high ({self.high})")

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2


@dataclass(frozen=True, slots=True)
class Exponential:
    """Durations exponential with mean ``mean_seconds`` (M/M/c's service)."""

    mean_seconds: float

    def __post_init__(self) -> None:
        _positive("Exponential mean", self.mean_seconds)

    def sample(self, rng: random.Random) -> float:
        return max(1e-6, rng.expovariate(1.0 / self.mean_seconds))

    @property
    def mean(self) -> float:
        return self.mean_seconds


@dataclass(frozen=True, slots=True)
class Empirical:
    """Durations drawn uniformly (with replacement) from ``values``, e.g. the
    durations of a trace."""

    values: Sequence[float]

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.values)
        if not values:
            raise ValueError("Empirical needs at least one value")
        for v in values:
            _positive("Empirical value", v)
        object.__setattr__(self, "values", values)

    def sample(self, rng: random.Random) -> float:
        return rng.choice(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text.strip()!r} is not a finite number")
    return value


def _range(text: str, what: str) -> tuple[float, float]:
    """``"20-90"`` as (20.0, 90.0); any "-" may be the separator, so
    exponents such as ``1e-3-2`` work."""
    for i, ch in enumerate(text):
        if ch == "-" and i > 0:
            try:
                low, high = float(text[:i]), float(text[i + 1 :])
            except ValueError:
                continue
            if math.isfinite(low) and math.isfinite(high):
                return low, high
    raise ValueError(f"{what}: {text.strip()!r} is not a range LOW-HIGH (e.g. 20-90)")


_DURATION_FORMS = (
    "SECONDS, const:SECONDS, lognormal:LOW-HIGH (5th-95th percentiles), "
    "lognormal:median=M,sigma=S, uniform:LOW-HIGH, exp:MEAN"
)


def parse_durations(text: str) -> Durations:
    """A duration distribution from its CLI form: ``"30"`` or ``"const:30"``
    (every job 30 s), ``"exp:40"`` (exponential, mean 40 s),
    ``"lognormal:20-90"`` (5th and 95th percentiles),
    ``"lognormal:median=40,sigma=0.5"``, ``"uniform:20-90"``."""
    spec = text.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    try:
        if not sep:
            try:
                return Constant(float(spec))
            except ValueError:
                pass
            raise ValueError(f"unknown form (expected {_DURATION_FORMS})")
        if kind in ("const", "constant"):
            return Constant(_number(arg, "seconds"))
        if kind == "uniform":
            return Uniform(*_range(arg, "range"))
        if kind in ("exp", "exponential"):
            return Exponential(_number(arg, "mean"))
        if kind == "lognormal":
            if "=" not in arg:
                return LogNormal.from_range(*_range(arg, "range"))
            params: dict[str, float] = {}
            for item in arg.split(","):
                key, eq, value = item.partition("=")
                key = key.strip().lower()
                if not eq or key not in ("median", "sigma"):
                    raise ValueError(f"{item.strip()!r}: expected median=M and sigma=S")
                if key in params:
                    raise ValueError(f"{key} given twice")
                params[key] = _number(value, key)
            missing = [k for k in ("median", "sigma") if k not in params]
            if missing:
                raise ValueError(f"missing {' and '.join(missing)}")
            return LogNormal(params["median"], params["sigma"])
        raise ValueError(f"unknown kind {kind!r} (expected {_DURATION_FORMS})")
    except ValueError as e:
        raise ValueError(f"bad durations {text!r}: {e}") from None


# --------------------------------------------------------------------------
# generators

_THIRTY_SECONDS = Constant(30)  # the default durations (frozen, so safe to share)


def _with_durations(
    times: Iterable[float],
    image: str,
    courselab: str,
    durations: Durations,
    rng: random.Random,
) -> list[Arrival]:
    return [Arrival(t, image, courselab, durations.sample(rng)) for t in sorted(times)]


def poisson(
    rate: float,
    duration: float,
    *,
    image: str = "grader",
    courselab: str = "course",
    durations: Durations = _THIRTY_SECONDS,
    seed: int = 0,
    start: float = 0.0,
) -> list[Arrival]:
    """A Poisson process of ``rate`` jobs/s over ``duration`` seconds from
    ``start``: exponential inter-arrival times, arrivals in
    ``[start, start + duration)``."""
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"poisson rate must be a finite number >= 0, not {rate!r}")
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"poisson duration must be a finite number >= 0, not {duration!r}")
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"poisson start must be a finite number >= 0, not {start!r}")
    rng = random.Random(seed)
    times: list[float] = []
    if rate > 0:
        t = rng.expovariate(rate)
        while t < duration:
            times.append(start + t)
            t += rng.expovariate(rate)
    return _with_durations(times, image, courselab, durations, rng)


def burst(
    n: int,
    *,
    at: float = 0.0,
    spread: float = 0.0,
    image: str = "grader",
    courselab: str = "course",
    durations: Durations = _THIRTY_SECONDS,
    seed: int = 0,
) -> list[Arrival]:
    """``n`` jobs at once at ``at``, or spread uniformly over
    ``[at, at + spread]``."""
    if n < 0:
        raise ValueError(f"burst n must be >= 0, not {n!r}")
    if not (math.isfinite(at) and at >= 0):
        raise ValueError(f"burst at must be a finite number >= 0, not {at!r}")
    if not (math.isfinite(spread) and spread >= 0):
        raise ValueError(f"burst spread must be a finite number >= 0, not {spread!r}")
    rng = random.Random(seed)
    times = [at + spread * rng.random() if spread else at for _ in range(n)]
    return _with_durations(times, image, courselab, durations, rng)


def deadline_ramp(
    total: int,
    hours: float,
    *,
    tau_hours: float = 1.0,
    image: str = "grader",
    courselab: str = "course",
    durations: Durations = _THIRTY_SECONDS,
    seed: int = 0,
    start: float = 0.0,
) -> list[Arrival]:
    """Exactly ``total`` jobs over ``hours`` before a deadline, with arrival
    density proportional to ``exp(t / tau)``: the rate grows by e every
    ``tau_hours`` and peaks at the deadline (``start + hours * 3600``). With
    ``tau_hours=inf`` the arrivals are uniform.

    The times are drawn by inverting the CDF
    ``F(t) = (exp(t/tau) - 1) / (exp(T/tau) - 1)``, computed as
    ``t = T + tau * log1p((1 - u) * expm1(-T/tau))`` so a steep ramp
    (``T/tau`` in the hundreds) does not overflow."""
    if total < 0:
        raise ValueError(f"deadline_ramp total must be >= 0, not {total!r}")
    if not (math.isfinite(hours) and hours > 0):
        raise ValueError(f"deadline_ramp hours must be a finite number > 0, not {hours!r}")
    if not tau_hours > 0:  # inf allowed
        raise ValueError(f"deadline_ramp tau_hours must be > 0, not {tau_hours!r}")
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"deadline_ramp start must be a finite number >= 0, not {start!r}")
    rng = random.Random(seed)
    span = hours * 3600.0
    tau = tau_hours * 3600.0
    m = math.expm1(-span / tau)  # in (-1, 0]
    times: list[float] = []
    for _ in range(total):
        u = rng.random()
        if math.isinf(tau):
            t = u * span
        else:
            x = (1.0 - u) * m
            t = 0.0 if x <= -1.0 else span + tau * math.log1p(x)
        times.append(start + min(span, max(0.0, t)))
    return _with_durations(times, image, courselab, durations, rng)


def merge(*workloads: Sequence[Arrival]) -> list[Arrival]:
    """All the arrivals of ``workloads`` in one list sorted by ``at``
    (stable: ties keep the order of the arguments)."""
    return sorted((a for w in workloads for a in w), key=lambda a: a.at)


def rate_curve(arrivals: Iterable[Arrival], bin_seconds: float) -> list[tuple[float, float]]:
    """The arrival rate for a plot: ``(bin start, jobs/s)`` for every bin of
    ``bin_seconds`` from 0 to the bin of the last arrival, empty bins
    included; ``[]`` for no arrivals."""
    if not (math.isfinite(bin_seconds) and bin_seconds > 0):
        raise ValueError(f"bin_seconds must be a finite number > 0, not {bin_seconds!r}")
    counts: dict[int, int] = {}
    for a in arrivals:
        k = int(a.at // bin_seconds)
        counts[k] = counts.get(k, 0) + 1
    if not counts:
        return []
    return [(k * bin_seconds, counts.get(k, 0) / bin_seconds) for k in range(max(counts) + 1)]


# --------------------------------------------------------------------------
# the CLI's text form

_COMMON_KEYS = ("image", "courselab", "seed", "durations")
_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    # kind -> (canonical kind, its own keys)
    "ramp": ("ramp", ("total", "hours", "tau", "start")),
    "deadline": ("ramp", ("total", "hours", "tau", "start")),
    "deadline_ramp": ("ramp", ("total", "hours", "tau", "start")),
    "poisson": ("poisson", ("rate", "seconds", "hours", "start")),
    "burst": ("burst", ("n", "at", "spread")),
}
_WORKLOAD_FORMS = (
    "ramp:total=N,hours=H[,tau=HOURS][,start=S]; "
    "poisson:rate=JOBS_PER_S,seconds=S (or hours=H)[,start=S]; "
    "burst:n=N[,at=S][,spread=S]; "
    "each may add image=, courselab=, seed=, durations="
)
# a "+" that starts a new part ("...+poisson:..."), not one inside a number
_PART_SPLIT = re.compile(r"\+(?=\s*[A-Za-z_]\w*\s*:)")


def _split_params(body: str, keys: Sequence[str]) -> dict[str, str]:
    """``"total=3000,durations=lognormal:median=40,sigma=0.5"`` as a dict: an
    item whose key is not one of ``keys`` continues the ``durations=`` value
    before it (whose own form has commas)."""
    params: dict[str, str] = {}
    last: str | None = None
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if eq and key in keys:
            if key in params:
                raise ValueError(f"{key} given twice")
            params[key] = value.strip()
            last = key
        elif last == "durations":
            params["durations"] += "," + item.strip()
        elif not item.strip():
            raise ValueError("empty parameter (a stray comma?)")
        elif not eq:
            raise ValueError(f"{item.strip()!r} is not KEY=VALUE")
        else:
            raise ValueError(f"unknown parameter {key!r} (expected one of {', '.join(keys)})")
    return params


def _parse_part(part: str, index: int) -> list[Arrival]:
    kind_text, sep, body = part.partition(":")
    kind_name = kind_text.strip().lower()
    if not sep or kind_name not in _KINDS:
        what = f"unknown kind {kind_name!r}" if sep else "no KIND:"
        raise ValueError(f"{what} (expected {_WORKLOAD_FORMS})")
    kind, own = _KINDS[kind_name]
    keys = own + _COMMON_KEYS
    params = _split_params(body, keys) if body.strip() else {}

    def number(key: str, default: float | None = None) -> float:
        if key not in params:
            if default is None:
                raise ValueError(f"missing {key}=")
            return default
        return _number(params[key], key)

    def integer(key: str, default: int | None = None) -> int:
        if key not in params:
            if default is None:
                raise ValueError(f"missing {key}=")
            return default
        try:
            return int(params[key])
        except ValueError:
            raise ValueError(f"{key}: {params[key]!r} is not an integer") from None

    def text(key: str, default: str) -> str:
        value = params.get(key, default)
        if not value:
            raise ValueError(f"{key} is empty")
        return value

    image = text("image", "grader")
    courselab = text("courselab", "course")
    seed = integer("seed", index)
    durations: Durations = (
        parse_durations(params["durations"]) if "durations" in params else _THIRTY_SECONDS
    )
    if kind == "ramp":
        return deadline_ramp(
            integer("total"),
            number("hours"),
            tau_hours=number("tau", 1.0),
            image=image,
            courselab=courselab,
            durations=durations,
            seed=seed,
            start=number("start", 0.0),
        )
    if kind == "poisson":
        if ("seconds" in params) == ("hours" in params):
            raise ValueError("give exactly one of seconds= and hours=")
        span = number("seconds") if "seconds" in params else number("hours") * 3600
        return poisson(
            number("rate"),
            span,
            image=image,
            courselab=courselab,
            durations=durations,
            seed=seed,
            start=number("start", 0.0),
        )
    return burst(
        integer("n"),
        at=number("at", 0.0),
        spread=number("spread", 0.0),
        image=image,
        courselab=courselab,
        durations=durations,
        seed=seed,
    )


def parse_workload(spec: str) -> list[Arrival]:
    """A workload from the CLI's text form, for instance
    ``"ramp:total=3000,hours=6,tau=1,durations=lognormal:20-90"``,
    ``"poisson:rate=0.5,seconds=3600,durations=30"`` or
    ``"burst:n=2000,courselab=A"``. Several parts joined with ``+`` are
    merged. Each part may set ``image=`` (default "grader"), ``courselab=``
    (default "course"), ``durations=`` (see :func:`parse_durations`; default
    30 s) and ``seed=``; the default seed of the i-th part (from 0) is i, so
    two otherwise equal parts are not the same jobs twice."""
    if not spec.strip():
        raise ValueError(f"empty workload (expected {_WORKLOAD_FORMS})")
    parts = _PART_SPLIT.split(spec)
    workloads: list[list[Arrival]] = []
    for i, part in enumerate(parts):
        try:
            workloads.append(_parse_part(part, i))
        except ValueError as e:
            where = f"part {i + 1} {part.strip()!r}" if len(parts) > 1 else repr(part.strip())
            raise ValueError(f"bad workload {where}: {e}") from None
    return merge(*workloads)


# --------------------------------------------------------------------------
# traces


def write_trace(path: str | os.PathLike[str], arrivals: Iterable[Arrival]) -> None:
    """Write ``arrivals`` as a trace file (the columns are in the module
    docstring), sorted, with submit_time in seconds from the first job."""
    ordered = sorted(arrivals, key=lambda a: a.at)
    first = ordered[0].at if ordered else 0.0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(TRACE_COLUMNS)
        for a in ordered:
            writer.writerow(
                [repr(a.at - first), a.image, a.courselab, repr(a.duration), a.outcome or ""]
            )


_Row = tuple[float, str, str, float, str | None]


def _check_row(row: _Row, where: str) -> None:
    submit, image, courselab, duration, _ = row
    if not math.isfinite(submit) or submit < 0:
        raise ValueError(f"{where}: submit_time {submit!r} is not a finite number >= 0")
    if not image:
        raise ValueError(f"{where}: image is empty")
    if not courselab:
        raise ValueError(f"{where}: courselab is empty")
    if not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"{where}: duration {duration!r} is not a finite number > 0")


def _from_checked(rows: list[_Row]) -> list[Arrival]:
    first = min((r[0] for r in rows), default=0.0)
    return sorted(
        (Arrival(s - first, img, cl, d, outcome or None) for s, img, cl, d, outcome in rows),
        key=lambda a: a.at,
    )


def read_trace(path: str | os.PathLike[str]) -> list[Arrival]:
    """The arrivals of a trace file (columns in the module docstring), sorted
    and shifted so the first job is at 0. A bad header or row is a
    ValueError naming the file and the line."""
    rows: list[_Row] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected a header {','.join(TRACE_COLUMNS)})")
        if tuple(h.strip().lower() for h in header) != TRACE_COLUMNS:
            raise ValueError(
                f"{path}, line {reader.line_num}: the header is {','.join(header)!r}, "
                f"expected {','.join(TRACE_COLUMNS)!r}"
            )
        for fields in reader:
            where = f"{path}, line {reader.line_num}"
            if not fields or all(not x.strip() for x in fields):
                continue
            if len(fields) != len(TRACE_COLUMNS):
                raise ValueError(
                    f"{where}: {len(fields)} columns, expected {len(TRACE_COLUMNS)} "
                    f"({','.join(TRACE_COLUMNS)})"
                )
            submit_text, image, courselab, duration_text, outcome = (x.strip() for x in fields)
            row = (
                _number(submit_text, f"{where}: submit_time"),
                image,
                courselab,
                _number(duration_text, f"{where}: duration"),
                outcome or None,
            )
            _check_row(row, where)
            rows.append(row)
    return _from_checked(rows)


def trace_from_rows(rows: Iterable[tuple[float, str, str, float, str | None]]) -> list[Arrival]:
    """Arrivals from ``(submit epoch, image, courselab, duration, outcome)``
    tuples (e.g. finished jobs from the server's job store), sorted and
    shifted so the first job is at 0. A bad row is a ValueError naming it
    (counted from 1)."""
    checked: list[_Row] = []
    for i, (submit, image, courselab, duration, outcome) in enumerate(rows, 1):
        row = (float(submit), image, courselab, float(duration), outcome or None)
        _check_row(row, f"row {i}")
        checked.append(row)
    return _from_checked(checked)
