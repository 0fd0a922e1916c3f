"""Workload generators, traces and the queueing formulas of vmpool.load."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from vmpool.load.erlang import (
    erlang_b,
    erlang_c,
    mdc_mean_wait,
    mmc_mean_wait,
    mmc_wait_cdf,
    mmc_wait_quantile,
    servers_for_wait,
)
from vmpool.load.workload import (
    Arrival,
    Constant,
    Empirical,
    LogNormal,
    Uniform,
    burst,
    deadline_ramp,
    merge,
    parse_durations,
    parse_workload,
    poisson,
    rate_curve,
    read_trace,
    trace_from_rows,
    write_trace,
)

# --------------------------------------------------------------------------
# generators


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_count_and_mean_gap(seed: int) -> None:
    rate, seconds = 2.0, 1000.0
    jobs = poisson(rate, seconds, seed=seed, start=50.0)
    expected = rate * seconds
    assert abs(len(jobs) - expected) < 4 * math.sqrt(expected)
    times = [a.at for a in jobs]
    assert times == sorted(times)
    assert all(50.0 <= t < 50.0 + seconds for t in times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean_gap = sum(gaps) / len(gaps)
    # the mean of n exponential gaps has standard deviation (1/rate)/sqrt(n)
    assert abs(mean_gap - 1 / rate) < 4 * (1 / rate) / math.sqrt(len(gaps))
    assert all(a.duration == 30 and a.outcome is None for a in jobs)


def test_poisson_zero_rate_and_bad_arguments() -> None:
    assert poisson(0, 100) == []
    with pytest.raises(ValueError, match="rate"):
        poisson(-1, 100)
    with pytest.raises(ValueError, match="duration"):
        poisson(1, math.inf)


def test_generators_are_deterministic_by_seed() -> None:
    d = LogNormal.from_range(20, 90)
    assert poisson(1, 500, durations=d, seed=7) == poisson(1, 500, durations=d, seed=7)
    assert poisson(1, 500, durations=d, seed=7) != poisson(1, 500, durations=d, seed=8)
    assert deadline_ramp(500, 2, durations=d, seed=3) == deadline_ramp(500, 2, durations=d, seed=3)
    assert deadline_ramp(500, 2, seed=3) != deadline_ramp(500, 2, seed=4)
    assert burst(50, spread=10, durations=d, seed=1) == burst(50, spread=10, durations=d, seed=1)
    # the times do not depend on the durations drawn after them
    a = [x.at for x in poisson(1, 500, seed=5)]
    b = [x.at for x in poisson(1, 500, seed=5, durations=d)]
    assert a == b


def test_burst() -> None:
    jobs = burst(100, at=10.0, image="py", courselab="A")
    assert len(jobs) == 100
    assert all(a.at == 10.0 and a.image == "py" and a.courselab == "A" for a in jobs)
    spread = burst(1000, at=5.0, spread=20.0, seed=2)
    times = [a.at for a in spread]
    assert times == sorted(times)
    assert all(5.0 <= t <= 25.0 for t in times)
    assert min(times) < 6.0 and max(times) > 24.0
    assert burst(0) == []


def test_deadline_ramp_count_range_and_last_hour_share() -> None:
    total, hours, tau = 20000, 6.0, 1.0
    jobs = deadline_ramp(total, hours, tau_hours=tau, seed=11)
    assert len(jobs) == total
    times = [a.at for a in jobs]
    assert times == sorted(times)
    assert all(0.0 <= t <= hours * 3600 for t in times)
    # density ~ exp(t/tau): the last hour holds (e^(H/tau) - e^((H-1)/tau)) / (e^(H/tau) - 1)
    share = sum(t >= (hours - 1) * 3600 for t in times) / total
    expected = (1 - math.exp(-1 / tau)) / (1 - math.exp(-hours / tau))
    assert abs(share - expected) < 0.02
    # and the first hour very little
    first = sum(t < 3600 for t in times) / total
    assert abs(first - (math.e - 1) / (math.exp(hours) - 1)) < 0.005


def test_deadline_ramp_extremes() -> None:
    steep = deadline_ramp(1000, 6, tau_hours=0.001, seed=1)  # T/tau = 6000: no overflow
    assert len(steep) == 1000
    assert all(6 * 3600 - 60 <= a.at <= 6 * 3600 for a in steep)
    flat = deadline_ramp(20000, 1, tau_hours=math.inf, seed=1)  # uniform
    assert abs(sum(a.at < 1800 for a in flat) / 20000 - 0.5) < 0.02
    late = deadline_ramp(10, 1, start=100.0)
    assert all(100.0 <= a.at <= 3700.0 for a in late)
    with pytest.raises(ValueError, match="tau_hours"):
        deadline_ramp(10, 1, tau_hours=0)


def test_merge_is_sorted_and_stable() -> None:
    a = burst(3, at=5.0, courselab="A")
    b = burst(3, at=5.0, courselab="B")
    c = poisson(1, 20, courselab="C", seed=3)
    merged = merge(a, b, c)
    assert len(merged) == len(a) + len(b) + len(c)
    assert [x.at for x in merged] == sorted(x.at for x in merged)
    ties = [x.courselab for x in merged if x.at == 5.0]
    assert ties == ["A"] * 3 + ["B"] * 3


def test_rate_curve() -> None:
    jobs = [Arrival(t, "i", "c", 1.0) for t in (0.0, 1.0, 9.9, 25.0)]
    assert rate_curve(jobs, 10.0) == [(0.0, 0.3), (10.0, 0.0), (20.0, 0.1)]
    assert rate_curve([], 10.0) == []
    steady = rate_curve(poisson(2.0, 1000.0, seed=1), 100.0)
    assert len(steady) == 10
    assert all(1.5 < r < 2.5 for _, r in steady)
    with pytest.raises(ValueError):
        rate_curve(jobs, 0)


def test_arrival_validation() -> None:
    with pytest.raises(ValueError, match="duration"):
        Arrival(0.0, "i", "c", 0.0)
    with pytest.raises(ValueError, match="at"):
        Arrival(-1.0, "i", "c", 1.0)
    with pytest.raises(ValueError, match="image"):
        Arrival(0.0, "", "c", 1.0)


# --------------------------------------------------------------------------
# durations


def test_lognormal_from_range_percentiles() -> None:
    d = LogNormal.from_range(20, 90)
    rng = random.Random(42)
    samples = [d.sample(rng) for _ in range(20000)]
    below = sum(s < 20 for s in samples) / len(samples)
    above = sum(s > 90 for s in samples) / len(samples)
    assert abs(below - 0.05) < 0.01
    assert abs(above - 0.05) < 0.01
    assert d.median == pytest.approx(math.sqrt(20 * 90))
    assert sum(samples) / len(samples) == pytest.approx(d.mean, rel=0.03)


def test_other_durations() -> None:
    rng = random.Random(1)
    u = Uniform(20, 90)
    s = [u.sample(rng) for _ in range(5000)]
    assert all(20 <= x <= 90 for x in s)
    assert sum(s) / len(s) == pytest.approx(u.mean, rel=0.03)
    e = Empirical([1.0, 2.0, 6.0])
    assert e.mean == 3.0
    assert {e.sample(rng) for _ in range(200)} == {1.0, 2.0, 6.0}
    assert Constant(5).sample(rng) == 5 and Constant(5).mean == 5
    with pytest.raises(ValueError):
        Empirical([])
    with pytest.raises(ValueError):
        Uniform(90, 20)
    with pytest.raises(ValueError):
        Constant(0)


def test_parse_durations() -> None:
    assert parse_durations("30") == Constant(30)
    assert parse_durations("const:12.5") == Constant(12.5)
    assert parse_durations("lognormal:20-90") == LogNormal.from_range(20, 90)
    assert parse_durations("lognormal:median=40,sigma=0.5") == LogNormal(40, 0.5)
    assert parse_durations("uniform:20-90") == Uniform(20, 90)
    assert parse_durations("uniform:1e-3-2") == Uniform(0.001, 2)
    for bad, match in [
        ("abc", "unknown form"),
        ("gamma:1-2", "unknown kind 'gamma'"),
        ("uniform:20", "not a range"),
        ("lognormal:median=40", "missing sigma"),
        ("lognormal:median=40,sigma=x", "'x' is not a number"),
        ("const:-3", "> 0"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            parse_durations(bad)
        assert repr(bad) in str(info.value)


# --------------------------------------------------------------------------
# the CLI's text form


def test_parse_workload_examples() -> None:
    ramp = parse_workload("ramp:total=300,hours=6,tau=1,durations=lognormal:20-90")
    assert ramp == deadline_ramp(300, 6, tau_hours=1, durations=LogNormal.from_range(20, 90))
    p = parse_workload("poisson:rate=0.5,seconds=3600,durations=30")
    assert p == poisson(0.5, 3600, durations=Constant(30))
    b = parse_workload("burst:n=2000,courselab=A")
    assert len(b) == 2000 and all(a.courselab == "A" and a.at == 0 for a in b)
    # a durations form with commas of its own, followed by more parameters
    m = parse_workload(
        "ramp:total=10,hours=1,durations=lognormal:median=40,sigma=0.5,image=py,seed=4"
    )
    assert m == deadline_ramp(10, 1, durations=LogNormal(40, 0.5), image="py", seed=4)


def test_parse_workload_merges_parts_with_their_own_seeds() -> None:
    w = parse_workload("burst:n=5,courselab=A,spread=10 + burst:n=5,courselab=B,spread=10")
    assert len(w) == 10
    assert [a.at for a in w] == sorted(a.at for a in w)
    a_times = sorted(a.at for a in w if a.courselab == "A")
    b_times = sorted(a.at for a in w if a.courselab == "B")
    assert a_times != b_times  # part 2 defaults to seed 1, not the same draws again
    assert b_times == [x.at for x in burst(5, spread=10, seed=1)]
    # a "+" inside a number does not split
    assert len(parse_workload("poisson:rate=1e+0,seconds=100")) > 0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty workload"),
        ("wave:n=3", "unknown kind 'wave'"),
        ("n=3", "no KIND"),
        ("burst:count=3", "unknown parameter 'count'"),
        ("burst:n=x", "n: 'x' is not an integer"),
        ("ramp:total=10", "missing hours="),
        ("ramp:total=10,hours=abc", "hours: 'abc' is not a number"),
        ("poisson:rate=1", "exactly one of seconds= and hours="),
        ("burst:n=3,n=4", "n given twice"),
        ("burst:n=3,,at=1", "empty parameter"),
        ("burst:n=3,durations=weird", "bad durations 'weird'"),
        ("burst:n=2+poisson:rate=-1,seconds=5", "part 2 'poisson:rate=-1,seconds=5'"),
    ],
)
def test_parse_workload_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_workload(spec)


# --------------------------------------------------------------------------
# traces


def test_trace_round_trip(tmp_path: Path) -> None:
    jobs = merge(
        poisson(0.5, 200, courselab="A", durations=LogNormal(30, 0.4), seed=1, start=7.0),
        burst(3, at=50, image="img,with,commas", courselab="B"),
    )
    jobs = [*jobs, Arrival(300.0, "grader", "C", 12.0, "timeout")]
    path = tmp_path / "trace.csv"
    write_trace(path, jobs)
    assert path.read_text().splitlines()[0] == "submit_time,image,courselab,duration,outcome"
    back = read_trace(path)
    first = jobs[0].at
    assert back == [
        Arrival(a.at - first, a.image, a.courselab, a.duration, a.outcome) for a in jobs
    ]
    assert back[0].at == 0.0
    assert back[-1].outcome == "timeout" and back[0].outcome is None


def test_trace_epoch_shift_and_sort(tmp_path: Path) -> None:
    path = tmp_path / "epoch.csv"
    path.write_text(
        "submit_time,image,courselab,duration,outcome\n"
        "1700000010.5,py,A,20,success\n"
        "\n"
        "1700000000.25,py,B,3.5,\n"
        "1700000100,java,A,60,timeout\n"
    )
    jobs = read_trace(path)
    assert [a.at for a in jobs] == [0.0, 10.25, 99.75]
    assert [a.courselab for a in jobs] == ["B", "A", "A"]
    assert [a.outcome for a in jobs] == [None, "success", "timeout"]
    assert read_trace(write_path(tmp_path, "")) == []


def write_path(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "t.csv"
    path.write_text("submit_time,image,courselab,duration,outcome\n" + body)
    return path


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("0,py,A,20,\n1,py,A,20\n", "line 3: 4 columns, expected 5"),
        ("0,py,A,20,\nsoon,py,A,20,\n", "line 3: submit_time: 'soon' is not a number"),
        ("-5,py,A,20,\n", "line 2: submit_time -5.0 is not a finite number >= 0"),
        ("0,py,A,0,\n", "line 2: duration 0.0 is not a finite number > 0"),
        ("0,py,A,-1,\n", "line 2: duration -1.0"),
        ("0,py,A,nan,\n", "line 2: duration: 'nan' is not a finite number"),
        ("0,,A,20,\n", "line 2: image is empty"),
        ("0,py,A,,\n", "line 2: duration: '' is not a number"),
    ],
)
def test_trace_bad_rows(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        read_trace(write_path(tmp_path, body))


def test_trace_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("time,image,courselab,duration,outcome\n0,py,A,1,\n")
    with pytest.raises(ValueError, match="line 1: the header"):
        read_trace(path)
    path.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_trace(path)


def test_trace_from_rows() -> None:
    jobs = trace_from_rows(
        [
            (1700000050.0, "py", "A", 10.0, "success"),
            (1700000000.0, "py", "B", 5.0, ""),
            (1700000020.0, "java", "A", 7.5, None),
        ]
    )
    assert [(a.at, a.courselab, a.outcome) for a in jobs] == [
        (0.0, "B", None),
        (20.0, "A", None),
        (50.0, "A", "success"),
    ]
    assert trace_from_rows([]) == []
    with pytest.raises(ValueError, match="row 2: duration"):
        trace_from_rows([(1.0, "py", "A", 1.0, None), (2.0, "py", "A", 0.0, None)])


# --------------------------------------------------------------------------
# queueing formulas


def erlang_c_direct(c: int, a: Fraction) -> Fraction:
    """Erlang C from its textbook formula, in exact arithmetic."""
    top = a**c / math.factorial(c) * Fraction(c) / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def test_erlang_c_known_values() -> None:
    for rho in (0.1, 0.5, 0.9):
        assert erlang_c(1, rho, 1.0) == pytest.approx(rho)
    assert erlang_c(2, 1.0, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(2, 2.0, 2.0) == pytest.approx(1 / 3)  # only lam / mu matters
    assert erlang_c(3, 3.0, 1.0) == 1.0  # not stable
    assert erlang_c(3, 5.0, 1.0) == 1.0
    assert erlang_c(3, 0.0, 1.0) == 0.0
    assert erlang_b(1, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        erlang_c(0, 1.0, 1.0)


def test_erlang_c_against_the_direct_formula() -> None:
    for c in range(1, 51):
        for frac in (Fraction(1, 10), Fraction(1, 2), Fraction(9, 10), Fraction(99, 100)):
            a = c * frac
            assert erlang_c(c, float(a), 1.0) == pytest.approx(
                float(erlang_c_direct(c, a)), rel=1e-9
            )


def test_erlang_c_is_stable_for_many_servers() -> None:
    for c in (100, 300, 500, 2000):
        for rho in (0.5, 0.9, 0.99):
            value = erlang_c(c, rho * c, 1.0)
            assert 0.0 <= value <= 1.0 and math.isfinite(value)
    # Erlang C falls with c at a fixed load
    values = [erlang_c(c, 400.0, 1.0) for c in range(401, 501)]
    assert all(x > y for x, y in itertools.pairwise(values))
    # square-root staffing: c = a + beta sqrt(a) gives C close to the Halfin-Whitt limit
    a, beta = 400.0, 1.0
    c = int(a + beta * math.sqrt(a))
    phi = math.exp(-(beta**2) / 2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(beta / math.sqrt(2)))
    assert erlang_c(c, a, 1.0) == pytest.approx(1 / (1 + beta * big_phi / phi), abs=0.02)


def test_wait_cdf_quantile_and_mean() -> None:
    c, lam, mu = 4, 3.0, 1.0
    waits = erlang_c(c, lam, mu)
    assert mmc_wait_cdf(0.0, c, lam, mu) == pytest.approx(1 - waits)
    assert mmc_wait_cdf(-1.0, c, lam, mu) == 0.0
    for q in (0.6, 0.8, 0.95, 0.99):
        t = mmc_wait_quantile(q, c, lam, mu)
        assert t > 0
        assert mmc_wait_cdf(t, c, lam, mu) == pytest.approx(q)
    assert mmc_wait_quantile((1 - waits) / 2, c, lam, mu) == 0.0
    assert mmc_wait_quantile(1.0, c, lam, mu) == math.inf
    assert mmc_mean_wait(c, lam, mu) == pytest.approx(waits / (c * mu - lam))
    # the mean is the integral of 1 - cdf
    dt = 0.001
    integral = sum((1 - mmc_wait_cdf(i * dt, c, lam, mu)) * dt for i in range(20000))
    assert integral == pytest.approx(mmc_mean_wait(c, lam, mu), rel=1e-3)
    # not stable
    assert mmc_mean_wait(2, 2.0, 1.0) == math.inf
    assert mmc_wait_quantile(0.5, 2, 3.0, 1.0) == math.inf
    assert mmc_wait_cdf(100.0, 2, 3.0, 1.0) == 0.0
    # M/M/1: W_q = rho / (mu - lam)
    assert mmc_mean_wait(1, 0.5, 1.0) == pytest.approx(1.0)


def test_mdc_mean_wait() -> None:
    # exact for M/D/1 (Pollaczek-Khinchine): W_q = rho d / (2 (1 - rho))
    lam, d = 0.7, 1.0
    assert mdc_mean_wait(1, lam, d) == pytest.approx(0.7 / (2 * 0.3))
    assert mdc_mean_wait(5, 4.0, 1.0) == pytest.approx(mmc_mean_wait(5, 4.0, 1.0) / 2)
    assert mdc_mean_wait(5, 10.0, 1.0) == math.inf


def test_servers_for_wait() -> None:
    lam, mu = 5.0, 1 / 40  # 5 jobs/s of 40 s: 200 Erlangs
    c = servers_for_wait(lam, mu, 10.0, q=0.95)
    assert c > 200
    assert mmc_wait_quantile(0.95, c, lam, mu) <= 10.0
    assert mmc_wait_quantile(0.95, c - 1, lam, mu) > 10.0
    # monotone: a longer allowed wait never needs more servers
    needed = [servers_for_wait(lam, mu, t) for t in (0.0, 0.5, 1, 2, 5, 10, 30, 100, 1000)]
    assert needed == sorted(needed, reverse=True)
    assert needed[0] > needed[-1] > 200
    # a higher quantile never needs fewer
    by_q = [servers_for_wait(lam, mu, 5.0, q=q) for q in (0.5, 0.9, 0.95, 0.99, 0.999)]
    assert by_q == sorted(by_q)
    # tiny loads
    assert servers_for_wait(0.0, 1.0, 1.0) == 0
    assert servers_for_wait(0.01, 1.0, 1.0) == 1
    with pytest.raises(ValueError, match="max_c"):
        servers_for_wait(1000.0, 1.0, 1.0, max_c=500)
