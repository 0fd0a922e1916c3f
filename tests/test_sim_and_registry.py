"""The sim driver's knobs, the driver registry, settings validation."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import anyio
import pytest

from vmpool import (
    VMMS,
    Settings,
    TangoMachine,
    UnknownDriverError,
    available_drivers,
    load_driver,
    register_driver,
)
from vmpool.errors import CopyOutError, InitializeVMError, RunJobError
from vmpool.models import InputFile
from vmpool.vmms import Feedback
from vmpool_drivers.sim import FaultRule, Latency, SimVMMS

ELISION = b"\n...[excess bytes elided]...\n"


def test_latency_parsing_and_sampling() -> None:
    rng = random.Random(1)
    assert Latency.parse("0.05").sample(rng) == 0.05
    assert Latency.parse(0.2) == Latency("const", 0.2)
    u = Latency.parse("uniform:0.01,0.02")
    assert all(0.01 <= u.sample(rng) <= 0.02 for _ in range(100))
    e = Latency.parse("exp:0.01")
    assert sum(e.sample(rng) for _ in range(4000)) / 4000 == pytest.approx(0.01, rel=0.1)
    ln = Latency.parse("lognormal:0.05,0.5")
    samples = sorted(ln.sample(rng) for _ in range(4001))
    assert samples[2000] == pytest.approx(0.05, rel=0.1)
    for bad in ("fast", "uniform:3", "uniform:0.2,0.1", "-1"):
        with pytest.raises(ValueError):
            Latency.parse(bad)


def test_same_seed_same_run() -> None:
    def draws(seed: int) -> list[float]:
        sim = SimVMMS(seed=seed, latency={"runJob": "uniform:0,1"})
        return [sim.latency["runJob"].sample(sim.rng) for _ in range(5)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_fault_rule_validation() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        FaultRule("runjob")
    with pytest.raises(ValueError, match="applies to runJob only"):
        FaultRule("copyIn", "status")
    with pytest.raises(ValueError, match="probability"):
        FaultRule("copyIn", probability=2)


async def test_fault_actions_and_live_record() -> None:
    sim = SimVMMS()
    vm = TangoMachine(name="img", image="img.img", id=1)
    sim.add_fault(FaultRule("initializeVM", "raise", times=1))
    with pytest.raises(InitializeVMError):
        await sim.initializeVM(vm)
    # a failed creation still holds resources until destroyed
    assert list(sim.live) == ["local-1-img"]
    await sim.destroyVM(vm)
    assert sim.live == {}
    await sim.initializeVM(vm)
    sim.add_fault(FaultRule("runJob", "status", times=1, status=3))
    assert await sim.runJob(vm, 10, 1000, True) == 3
    sim.add_fault(FaultRule("runJob", "crash", times=1))
    with pytest.raises(RuntimeError, match="simulated driver bug"):
        await sim.runJob(vm, 10, 1000, True)
    sim.add_fault(FaultRule("runJob", "raise", times=1))
    with pytest.raises(RunJobError):
        await sim.runJob(vm, 10, 1000, True)
    sim.add_fault(FaultRule("waitVM", "hang", times=1))
    with anyio.move_on_after(0.05) as scope:
        await sim.waitVM(vm, 1)
    assert scope.cancelled_caught
    assert await sim.runJob(vm, 10, 1000, True) == 0
    assert dict(sim.faults_fired) == {
        "initializeVM:raise": 1, "runJob:status": 1, "runJob:crash": 1, "runJob:raise": 1,
        "waitVM:hang": 1,
    }
    assert [v.id for v in await sim.getVMs()] == [1]


async def _sim_job(sim: SimVMMS, vm: TangoMachine, tmp_path: Path, spec: object,
                   run_timeout: float = 10, max_output: int = 1000) -> tuple[int, bytes]:
    """Run one job described by ``spec`` (a sim-job.json): (status, feedback)."""
    job = tmp_path / "sim-job.json"
    job.write_text(json.dumps(spec))
    await sim.copyIn(vm, [InputFile(str(tmp_path / "Makefile"), "Makefile"),
                          InputFile(str(job), "sim-job.json")])
    status = await sim.runJob(vm, run_timeout, max_output, True)
    out = tmp_path / "feedback"
    await sim.copyOut(vm, str(out))
    return status, out.read_bytes()


async def test_a_job_describes_its_simulated_run(tmp_path: Path) -> None:
    sim = SimVMMS(output="fixed\n")
    vm = TangoMachine(name="img", image="img.img", id=1)
    await sim.initializeVM(vm)
    assert await _sim_job(sim, vm, tmp_path, {"output": "hi\n", "make_status": 2}) == (
        0, b"Autodriver: Job exited with status 2\nhi\n")
    assert await _sim_job(sim, vm, tmp_path, {}) == (0, b"Autodriver: Job exited with status 0\n")
    assert await _sim_job(sim, vm, tmp_path, {"exit": 3, "seconds": 100}) == (
        3, b"Autodriver: simulated status 3\n")
    # the output is capped as the autodriver caps it, status line apart
    status, fb = await _sim_job(sim, vm, tmp_path, {"output": "a" * 50 + "b" * 50},
                                max_output=10)
    assert (status, fb) == (0, b"Autodriver: Job exited with status 0\n" + b"aaaaa" + ELISION
                            + b"bbbbb")
    start = time.monotonic()
    assert await _sim_job(sim, vm, tmp_path, {"output": "x\n", "seconds": 0.05}) == (
        0, b"Autodriver: Job exited with status 0\nx\n")
    assert time.monotonic() - start >= 0.05
    # longer than the timeout: stopped at the timeout
    start = time.monotonic()
    assert await _sim_job(sim, vm, tmp_path, {"output": "x\n", "seconds": 100},
                          run_timeout=0.1) == (
        2, b"Autodriver: Job timed out after 0.1 seconds\nx\n")
    assert 0.1 <= time.monotonic() - start < 5
    # the description is its job's only: the next job prints the fixed output
    await sim.copyIn(vm, [InputFile(str(tmp_path / "Makefile"), "Makefile")])
    assert await sim.runJob(vm, 10, 1000, True) == 0
    assert vm.feedback == Feedback(data=b"Autodriver: Job exited with status 0\nfixed\n")
    # faults still apply first
    sim.add_fault(FaultRule("runJob", "status", times=1, status=1))
    assert await _sim_job(sim, vm, tmp_path, {"exit": 3}) == (
        1, b"Autodriver: simulated status 1\n")
    # a bad description fails the runJob, naming it
    with pytest.raises(RunJobError, match=r"sim-job.json .*seconds must be a number >= 0"):
        await _sim_job(sim, vm, tmp_path, {"seconds": "soon"})
    # cancelled half-way: nothing left behind
    job = tmp_path / "sim-job.json"
    job.write_text(json.dumps({"seconds": 100}))
    await sim.copyIn(vm, [InputFile(str(job), "sim-job.json")])
    with anyio.move_on_after(0.05):
        await sim.runJob(vm, 0, 1000, True)
    assert vm.feedback is None and "sim_job" not in vm.driver_data
    with pytest.raises(CopyOutError, match="no feedback: runJob did not run"):
        await sim.copyOut(vm, str(tmp_path / "feedback"))
    await sim.destroyVM(vm)


async def test_copy_out_writes_each_form_of_feedback(tmp_path: Path) -> None:
    """The base copyOut: a spooled file is moved, a driver's own file copied,
    data written; the feedback is taken either way."""
    sim = SimVMMS()
    vm = TangoMachine(name="img", image="img.img", id=1)
    spool = tmp_path / "spool"
    spool.write_bytes(b"spooled\n")
    vm.feedback = Feedback(path=spool, spooled=True)
    await VMMS.copyOut(sim, vm, str(tmp_path / "a"))
    assert (tmp_path / "a").read_bytes() == b"spooled\n" and not spool.exists()
    assert vm.feedback is None
    own = tmp_path / "own"
    own.write_bytes(b"kept\n")
    vm.feedback = Feedback(path=own)
    await VMMS.copyOut(sim, vm, str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"kept\n" and own.exists()
    big = os.urandom(256 * 1024)  # written in a thread
    vm.feedback = Feedback(data=big)
    await VMMS.copyOut(sim, vm, str(tmp_path / "c"))
    assert (tmp_path / "c").read_bytes() == big
    # a spooled file never copied out is deleted; one that cannot be written, too
    spool.write_bytes(b"x")
    vm.feedback = Feedback(path=spool, spooled=True)
    sim.discard_feedback(vm)
    assert vm.feedback is None and not spool.exists()
    spool.write_bytes(b"x")
    vm.feedback = Feedback(path=spool, spooled=True)
    with pytest.raises(CopyOutError, match="writing the feedback"):
        await VMMS.copyOut(sim, vm, str(tmp_path / "missing" / "d"))
    assert vm.feedback is None and not spool.exists()
    with pytest.raises(CopyOutError, match="no feedback: runJob did not run"):
        await VMMS.copyOut(sim, vm, str(tmp_path / "e"))
    with pytest.raises(ValueError):
        Feedback()


def test_drivers_are_found_by_entry_point() -> None:
    assert {"sim", "local"} <= set(available_drivers())
    drv = load_driver("sim", owner="me", seed=3)
    assert isinstance(drv, SimVMMS) and drv.owner == "me"
    with pytest.raises(UnknownDriverError, match=r"no driver named 'nope' \(known: .*sim"):
        load_driver("nope")


def test_a_third_party_driver_can_be_registered() -> None:
    class Mine(SimVMMS):
        driver_name = "mine"

    register_driver("mine", Mine)
    drv = load_driver("mine")
    assert isinstance(drv, VMMS) and drv.driver_name == "mine"
    assert "mine" in available_drivers()


def test_settings_are_validated_with_names() -> None:
    with pytest.raises(ValueError, match=r"waitvm_timeout must be >= 0, got -1"):
        Settings(waitvm_timeout=-1)
    s = Settings.from_env({"VMPOOL_JOB_RETRIES": "5", "VMPOOL_REUSE_VMS": "yes"})
    assert s.job_retries == 5 and s.reuse_vms is True
    with pytest.raises(ValueError, match="VMPOOL_POOL_SIZE='many'"):
        Settings.from_env({"VMPOOL_POOL_SIZE": "many"})
