"""The sim driver's knobs, the driver registry, settings validation."""

from __future__ import annotations

import random

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
from vmpool.errors import InitializeVMError, RunJobError
from vmpool_drivers.sim import FaultRule, Latency, SimVMMS


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
