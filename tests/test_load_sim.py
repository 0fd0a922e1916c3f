"""The simulator and the tuner (vmpool.load): the real scheduler on a
virtual clock, checked against a real-time run, against queueing theory
(Erlang C), and the fair share between courselabs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from vmpool import Adaptive
from vmpool.load.clock import run_virtual
from vmpool.load.erlang import erlang_c, mmc_mean_wait, mmc_wait_quantile, servers_for_wait
from vmpool.load.simulate import Candidate, Latencies, simulate
from vmpool.load.tune import Target, candidates, tune
from vmpool.load.workload import Arrival, Constant, Exponential, burst, merge, poisson

#: VMs made at once and never destroyed: an M/M/c queue's c servers
NO_OVERHEAD = Latencies(initializeVM=0.0, waitVM=0.0, copyIn=0.0, copyOut=0.0, destroyVM=0.0)


def test_the_virtual_clock_jumps_and_keeps_order() -> None:
    import anyio

    seen: list[tuple[str, float]] = []

    async def main() -> float:
        t0 = anyio.current_time()

        async def sleeper(name: str, s: float) -> None:
            await anyio.sleep(s)
            seen.append((name, anyio.current_time() - t0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper, "late", 3600.0)
            tg.start_soon(sleeper, "early", 1.5)
            with anyio.move_on_after(100.0):
                await anyio.sleep_forever()
        return anyio.current_time() - t0

    import time

    wall = time.perf_counter()
    elapsed = run_virtual(main)
    # an hour of clock, not an hour of waiting (the bound is generous: the
    # test is that the clock jumps, not how fast)
    assert time.perf_counter() - wall < 60
    assert seen == [("early", 1.5), ("late", 3600.0)]
    assert elapsed == 3600.0


def test_virtual_and_real_time_runs_of_one_workload_agree() -> None:
    # A few seconds of real time: 24 jobs, 0.3 s to make a VM, one-shot VMs,
    # 1 warm, at most 3 (jobs wait for VMs being made). The same code on the
    # real clock and on the virtual one: the waits agree within 0.15 s
    # (what timers and the real run's own work shift them by).
    arrivals = poisson(6.0, 4.0, durations=Constant(0.25), seed=3)
    lat = Latencies(initializeVM=0.25, waitVM=0.05, copyIn=0.0, copyOut=0.0, destroyVM=0.05)
    cand = Candidate(min_idle=1, max_size=3)
    virtual = simulate(arrivals, cand, lat, sample_every=0.5)
    real = simulate(arrivals, cand, lat, sample_every=0.5, real_time=True)
    assert virtual.jobs == real.jobs == len(arrivals) >= 15
    assert virtual.outcomes == real.outcomes == {"success": len(arrivals)}
    assert virtual.wait(95) > 0.2  # jobs did wait (the test is not of empty queues)
    for q in (50, 95):
        assert abs(virtual.wait(q) - real.wait(q)) <= 0.15, (q, virtual.waits, real.waits)
    assert abs(virtual.vm_seconds - real.vm_seconds) <= 0.15 * real.vm_seconds


@pytest.mark.parametrize("c", [3, 8])
def test_the_simulated_pool_is_an_mmc_queue(c: int) -> None:
    # c reused VMs (made before the first job, never destroyed), Poisson
    # arrivals, exponential durations, load 0.7: an M/M/c queue. Over three
    # workloads of 5,000 jobs (seeds 1-3), the simulated waits agree with
    # Erlang C for each workload's own arrival rate and mean duration: the
    # share of jobs that wait within 0.03, the mean and the p95 wait within
    # 12 %. (At this load a single 12,000-job sample strays by up to ~30 %
    # in one seed of four: waits are strongly correlated; hence three.)
    mean, rho = 10.0, 0.7
    lam = rho * c / mean
    waits: list[float] = []
    want_p, want_mean, want_p95 = [], [], []
    for seed in (1, 2, 3):
        arrivals = poisson(lam, 5_000 / lam, durations=Exponential(mean), seed=seed)
        lam_h = len(arrivals) / (arrivals[-1].at - arrivals[0].at)
        mu_h = len(arrivals) / sum(a.duration for a in arrivals)
        r = simulate(arrivals, Candidate(min_idle=c, max_size=c, reuse=True), NO_OVERHEAD)
        assert r.outcomes == {"success": len(arrivals)}
        assert r.utilisation == pytest.approx(lam_h / mu_h / c, rel=0.05)
        waits += r.waits
        want_p.append(erlang_c(c, lam_h, mu_h))
        want_mean.append(mmc_mean_wait(c, lam_h, mu_h))
        want_p95.append(mmc_wait_quantile(0.95, c, lam_h, mu_h))
    p_wait = sum(w > 1e-9 for w in waits) / len(waits)
    assert abs(p_wait - sum(want_p) / 3) < 0.03, (p_wait, want_p)
    assert sum(waits) / len(waits) == pytest.approx(sum(want_mean) / 3, rel=0.12)
    waits.sort()
    assert waits[int(0.95 * len(waits))] == pytest.approx(sum(want_p95) / 3, rel=0.12)


def test_the_tuner_picks_the_servers_erlang_c_asks_for() -> None:
    # The tuner (fixed pools of c reused VMs, c around the answer) against the
    # formula: the smallest c whose p95 wait is at most the target. The
    # target sits midway between that c's p95 and the next smaller c's, so
    # the simulation's few % of noise cannot flip the answer.
    mean, lam = 10.0, 0.45
    mu = 1 / mean
    want = servers_for_wait(lam, mu, 8.0)
    hi = mmc_wait_quantile(0.95, want - 1, lam, mu)
    lo = mmc_wait_quantile(0.95, want, lam, mu)
    assert lo < hi
    target = (hi + lo) / 2 if math.isfinite(hi) else lo * 2 + 1
    arrivals = poisson(lam, 6_000 / lam, durations=Exponential(mean), seed=11)
    space = [Candidate(n, n, reuse=True) for n in range(max(1, want - 2), want + 3)]
    tuning = tune(arrivals, NO_OVERHEAD, Target(wait=target), space, workers=2)
    assert tuning.met
    assert tuning.recommended.candidate.min_idle == servers_for_wait(lam, mu, target), (
        [(r.candidate.min_idle, r.wait(95)) for r in tuning.results])


def test_fair_share_keeps_a_small_course_moving_through_a_flood() -> None:
    # Course A submits 300 jobs at once, course B one a minute: 10 VMs, 30 s
    # jobs. In one FIFO line B waits behind A's whole flood; with the fair
    # line (the server's default) B's p95 wait stays under one job's
    # duration, and A finishes when it would have anyway.
    d = 30.0
    a = burst(300, courselab="A", durations=Constant(d))
    b = [Arrival(at=60.0 * i + 10, image="grader", courselab="B", duration=d)
         for i in range(15)]
    arrivals = merge(a, b)
    lat = Latencies(initializeVM=0.0, waitVM=0.0, copyIn=0.0, copyOut=0.0, destroyVM=0.0)
    fair = simulate(arrivals, Candidate(10, 10, reuse=True), lat)
    fifo = simulate(arrivals, Candidate(10, 10, reuse=True, fair=False), lat)
    assert len(fair.waits_by_courselab["B"]) == len(b) >= 10
    assert fair.wait(95, "B") < d, fair.waits_by_courselab["B"]
    assert fifo.wait(95, "B") > 10 * d  # the flood, without the fair line
    # no capacity is lost to fairness: everything ends when it did in FIFO,
    # and A is late by no more than B's own work (15 jobs on 10 VMs, in
    # whole rounds of 30 s) takes
    assert fair.makespan == pytest.approx(fifo.makespan, rel=0.01)
    a_fair, a_fifo = fair.last_end_by_courselab["A"], fifo.last_end_by_courselab["A"]
    assert a_fifo <= a_fair <= a_fifo + math.ceil(len(b) / 10) * d


def test_adaptive_sizing_grows_ahead_of_a_ramp_and_shrinks_after() -> None:
    # Arrivals at 0.5/s for 20 min, then nothing: the adaptive pool (floor
    # 0) has warm VMs while the load lasts, so jobs hardly wait for a VM
    # being made (60 s), and gives them back after its hold.
    arrivals = poisson(0.5, 1200, durations=Constant(20), seed=2)
    lat = Latencies(initializeVM=50, waitVM=10, copyIn=0, copyOut=0, destroyVM=1)
    adaptive = Adaptive(low=0, high=200, halflife=120, margin=2, hold=120, create=60)
    cold = simulate(arrivals, Candidate(0, 200), lat, sample_every=30)
    warm = simulate(arrivals, Candidate(0, 200, adaptive=adaptive), lat, sample_every=30,
                    tail=600)
    assert cold.wait(50) >= 59  # every job waits for its own VM
    # jobs wait only while the rate is being learnt, in the first minutes
    assert warm.wait(50) < 1 and warm.wait(75) < 6
    assert sum(warm.waits) / len(warm.waits) < sum(cold.waits) / len(cold.waits) / 5
    # and after the load (and the hold) the pool gives its VMs back
    peak = max(s.live for s in warm.timeline)
    assert peak > 20 and warm.timeline[-1].live <= 5 and warm.timeline[-1].busy == 0


def test_vmpool_tune_command(tmp_path: Path) -> None:
    out = tmp_path / "tune.json"
    p = subprocess.run(
        [sys.executable, "-m", "vmpool.cli", "tune",
         "--workload", "poisson:rate=0.2,seconds=1800,durations=30",
         "--create", "20", "--target-wait", "15", "--min-idle", "0,4,8", "--max-size",
         "30", "--adaptive", "--json", str(out), "--plot", str(tmp_path / "plots"),
         "--workers", "2"],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    assert len(data["candidates"]) == 3 + 3
    best = data["recommended"]
    assert data["met"] and best["wait_p95_s"] <= 15
    assert "recommended:" in p.stdout
    for png in ("sizes.png", "timeline.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "vmpool.cli", "tune", "--workload",
                          "poisson:rate=-1,seconds=10", "--target-wait", "5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "rate" in bad.stderr and "Traceback" not in bad.stderr


def test_candidates_cover_the_space() -> None:
    space = candidates([0, 5, 50], [10, 40], reuse=[False, True],
                       adaptive=[Adaptive(low=0, high=40)])
    fixed = [c for c in space if c.adaptive is None]
    assert len(fixed) == 2 * (2 + 2)  # min_idle 50 is over both caps: left out
    assert len(space) - len(fixed) == 2 * 2


def _vmpool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmpool.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_vmpool_bench_and_calibrate_on_the_sim_driver(tmp_path: Path) -> None:
    config = tmp_path / "vmpool.toml"
    config.write_text('[drivers.sim]\nlatency = { initializeVM = 0.2, waitVM = 0.05, '
                      'destroyVM = 0.02 }\n')
    out = tmp_path / "bench.json"
    p = _vmpool("bench", "--driver", "sim", "--jobs", "20", "--pool", "3", "--config",
                str(config), "--json", str(out), "--plot", str(tmp_path / "hist.png"))
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    assert data["succeeded"] == 20 and data["jobs_per_s"] > 0
    # one-shot VMs, each made in 0.25 s: jobs past the first 3 waited for one
    assert data["queue_wait_p99_ms"] >= 200
    assert (tmp_path / "hist.png").read_bytes()[:4] == b"\x89PNG"
    lat_file = tmp_path / "lat.json"
    p = _vmpool("bench", "--driver", "sim", "--config", str(config), "--calibrate",
                str(lat_file), "--samples", "3")
    assert p.returncode == 0, p.stderr
    lat = Latencies.load(lat_file)
    assert lat.initializeVM == pytest.approx(0.2, abs=0.05)
    assert lat.waitVM == pytest.approx(0.05, abs=0.03) and lat.create == pytest.approx(0.25,
                                                                                      abs=0.07)
    assert lat.source.startswith("calibrated: sim")


def test_traces_from_a_run_and_from_the_servers_store(tmp_path: Path) -> None:
    from vmpool.load.workload import read_trace
    from vmpool.models import TangoJob, TangoMachine
    from vmpool.server.store import SQLiteStore

    examples = Path(__file__).resolve().parents[1] / "examples"
    trace = tmp_path / "run.csv"
    p = _vmpool("run", str(examples / "hello"), "--driver", "sim", "--repeat", "3",
                "--trace", str(trace))
    assert p.returncode == 0, p.stderr
    rows = read_trace(trace)
    assert len(rows) == 3 and all(r.outcome == "success" and r.duration > 0 for r in rows)
    # the server's store: done jobs with their run time, pending ones left out
    db = tmp_path / "jobs.sqlite"
    store = SQLiteStore(db)
    for i, run in enumerate((12.5, 30.0, None)):
        job = TangoJob(vm=TangoMachine(name="lab", image="lab.img"), outputFile="/x",
                       name=f"j{i}")
        store.add(job, "key", f"course{i % 2}")
        if run is not None:
            store.finish(job, "success", "done", run, 1.0)
    store.close()
    out = tmp_path / "store.csv"
    p = _vmpool("trace", "--database", str(db), "-o", str(out))
    assert p.returncode == 0, p.stderr
    rows = read_trace(out)
    assert [(r.image, r.courselab, r.duration) for r in rows] == [
        ("lab.img", "course0", 12.5), ("lab.img", "course1", 30.0)]
