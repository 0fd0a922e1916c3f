"""Soak: thousands of jobs with faults injected on every VMMS call.

Every job must end exactly once with an output file that explains what
happened; no VM may leak (the sim's live set equals the pools' inventory,
and is empty after close); pools must be back at their target.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import anyio

from vmpool import JobHandle, Manager, Outcome, Settings
from vmpool_drivers.sim import FaultRule, SimVMMS

from .conftest import JobFactory, autograder_re

METHODS = ("initializeVM", "waitVM", "copyIn", "runJob", "copyOut", "destroyVM")

CLOSING = {
    Outcome.SUCCESS: "Success: Autodriver returned normally",
    Outcome.TIMEOUT: "Error: Job timed out after ",
    Outcome.INTERNAL_ERROR: "Internal error: Unable to complete job after 2 tries. Please resubmit",
    Outcome.ERROR: "Error: ",
}

N_JOBS = int(os.environ.get("VMPOOL_SOAK_JOBS", "2000"))


async def test_soak_with_faults_on_every_call(new_job: JobFactory) -> None:
    faults = []
    for m in METHODS:
        faults.append(FaultRule(m, "raise", probability=0.05))
        faults.append(FaultRule(m, "hang", probability=0.003))
    faults.append(FaultRule("runJob", "crash", probability=0.01))
    faults.append(FaultRule("runJob", "status", probability=0.01, status=3))
    faults.append(FaultRule("copyOut", "crash", probability=0.01))
    sim = SimVMMS(
        seed=1234,
        faults=faults,
        latency={
            "initializeVM": "uniform:0,0.004",
            "runJob": "uniform:0,0.004",
            "destroyVM": "uniform:0,0.002",
        },
    )
    settings = Settings(
        waitvm_timeout=0.2,
        runjob_timeout=5.0,
        runjob_grace=0.2,
        initializevm_timeout=0.2,
        copyin_timeout=0.2,
        copyout_timeout=0.2,
        destroy_timeout=0.2,
        backoff_initial=0.001,
        backoff_max=0.01,
        pool_size=16,
        pool_max_size=24,
        create_concurrency=8,
        default_vmms="sim",
    )
    ended: Counter[int] = Counter()
    handles: list[JobHandle] = []
    images = ["a.img", "b.img", "c.img"]
    async with Manager(settings, drivers={"sim": sim},
                       on_done=[lambda h: ended.update([h.id])]) as mgr:
        for i in range(N_JOBS):
            handles.append(await mgr.submit(new_job(images[i % 3], timeout=1)))
        with anyio.fail_after(240):
            await mgr.join()
        # quiescent: every pool back at its target, nothing in flight
        sim.clear_faults()
        with anyio.fail_after(30):
            for pool in mgr.pools.values():
                await pool.wait_until(
                    lambda s: s.free == s.min_idle and s.creating == 0 and s.destroying == 0
                    and s.busy == 0
                )
        inventory = {sim.instanceName(vm.id, vm.name) for vm in mgr.inventory()}
        assert inventory == set(sim.live)
        assert sum(p.status().total for p in mgr.pools.values()) == 16 * 3
        counters = mgr.scheduler.counters
    assert sim.live == {}
    assert len(ended) == N_JOBS and set(ended.values()) == {1}

    outcomes: Counter[Outcome] = Counter()
    for h in handles:
        r = h.result
        assert r is not None and r.output_written
        outcomes[r.outcome] += 1
        out = Path(h.job.outputFile).read_text().splitlines()
        assert re.fullmatch(autograder_re(f"Received job {h.job.name}:{h.id}"), out[0])
        assert any(CLOSING[r.outcome] in line for line in out), (r, out)
        assert "---" in out
        # each failed try is explained
        assert sum("failed: " in line for line in out) == len(r.failures) == r.retries + (
            1 if r.outcome is Outcome.INTERNAL_ERROR else 0
        )
    print(f"\nsoak: {N_JOBS} jobs: {dict(outcomes)}; faults fired {dict(sim.faults_fired)}")
    assert sum(sim.faults_fired.values()) > N_JOBS * 0.2
    assert outcomes[Outcome.SUCCESS] > N_JOBS * 0.5
    assert counters.outcomes == {o.value: outcomes[o] for o in Outcome}
    # no stray files: exactly one output per job
    outdir = Path(handles[0].job.outputFile).parent
    assert len(list(outdir.iterdir())) == N_JOBS
