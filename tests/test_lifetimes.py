"""The core's shape: a slot per VM (max_size is a cap), leases that always
go back, and lifetimes any task may end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import pytest
from trio.testing import MockClock

from vmpool import Manager, Pool, PoolSpec, Settings, TangoMachine
from vmpool.scheduler import Outcome
from vmpool_drivers.sim import FaultRule, SimVMMS, SimWorld

from .conftest import JobFactory

SPEC = PoolSpec("img.img", "sim")


class _Watched(dict[str, TangoMachine]):
    """The sim's set of live VMs, noting its largest size at every change."""

    peak = 0

    def __setitem__(self, key: str, value: TangoMachine) -> None:
        super().__setitem__(key, value)
        self.peak = max(self.peak, len(self))


def test_max_size_caps_live_vms_over_300_jobs_with_a_1s_destroy() -> None:
    """The reproduction: 10 ms create, 1 s destroy, max_size=2, 300 one-shot
    jobs. A slot is held until its VM's destruction has finished, so never
    more than 2 VMs exist, and every job still runs. On trio with a virtual
    clock (the pool is anyio only): 150 s of pool time in well under one."""
    world = SimWorld()
    live = _Watched()
    world.live = live
    sim = SimVMMS(world=world, latency={"initializeVM": 0.01, "waitVM": 0.001,
                                        "runJob": 0.005, "destroyVM": 1.0})
    done: list[int] = []

    async def main() -> None:
        pool = Pool(SPEC, sim, min_idle=2, max_size=2, destroy_timeout=5.0)
        async with pool:
            async def job(i: int) -> None:
                async with pool.lease() as lease:
                    await sim.runJob(lease.vm, 10, 0, True)
                    lease.healthy = True  # one-shot: destroyed all the same
                done.append(i)

            with anyio.fail_after(3600):
                async with anyio.create_task_group() as tg:
                    for i in range(300):
                        tg.start_soon(job, i)
            st = pool.status()
            assert st.busy == 0 and st.waiting == 0

    anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})
    assert sorted(done) == list(range(300))
    assert live.peak <= 2, f"{live.peak} VMs alive at once with max_size=2"
    assert sim.calls["initializeVM"] >= 300 and sim.live == {}


class _NameFailsOnce(SimVMMS):
    """A driver whose instanceName raises once: the scheduler calls it right
    after the hand-over, before any VMMS step."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.made: set[int | None] = set()

    async def initializeVM(self, vm: TangoMachine) -> None:
        await super().initializeVM(vm)
        self.made.add(vm.id)

    def instanceName(self, id: int | None, name: str) -> str:
        if not self.failed and id in self.made:  # a VM handed over, not one being made
            self.failed = True
            raise RuntimeError("instanceName broke")
        return super().instanceName(id, name)


STEPS = [(step, how) for step in ("waitVM", "copyIn", "runJob", "copyOut")
         for how in ("raise", "crash", "hang")]


@pytest.mark.parametrize(("where", "how"), [("instanceName", "crash"), *STEPS])
async def test_a_failing_step_never_leaves_a_vm_busy(
    where: str, how: str, fast: Settings, new_job: JobFactory
) -> None:
    """A driver that raises (typed or not) or hangs in any step after the
    hand-over: with max_size=1 a VM left busy would hold every later job
    forever."""
    sim: SimVMMS = _NameFailsOnce() if where == "instanceName" else SimVMMS()
    settings = fast.replace(pool_size=1, pool_max_size=1, job_retries=0)
    async with Manager(settings, drivers={"sim": sim}) as mgr:
        pool = await mgr.ensure_pool("img.img")
        with anyio.fail_after(10):
            await pool.wait_until(lambda s: s.free == 1)
        if where != "instanceName":
            # armed once the pool is warm: the step of the job fails, not the VM's making
            sim.add_fault(FaultRule(where, how, times=1))  # type: ignore[arg-type]
        with anyio.fail_after(10):
            first = await mgr.run(new_job())
            second = await mgr.run(new_job())
        assert first.result is not None and second.result is not None
        assert first.result.outcome is not Outcome.SUCCESS
        assert second.result.outcome is Outcome.SUCCESS, second.result.message
        st = next(iter(mgr.status().values()))
        assert st.busy == 0 and st.waiting == 0
    assert sim.live == {}


def _tasks() -> int:
    return len(asyncio.all_tasks())


async def _busy_manager(sim: SimVMMS, fast: Settings, new_job: JobFactory,
                        started: anyio.Event, box: dict[str, Any]) -> None:
    """A manager whose owner waits forever, with jobs running and queued."""
    sim.latency["runJob"] = sim.latency["runJob"].parse(30)
    async with Manager(fast.replace(pool_size=2, runjob_timeout=60), drivers={"sim": sim}) as mgr:
        box["mgr"] = mgr
        box["handles"] = [await mgr.submit(new_job()) for _ in range(4)]
        await sim.wait_for_calls("runJob", 2)
        started.set()
        await anyio.sleep_forever()
    box["left"] = True


@pytest.mark.parametrize("how", ["close", "request_close", "cancel"])
async def test_manager_ends_from_another_task(
    how: str, fast: Settings, new_job: JobFactory
) -> None:
    """close() or request_close() from another task, or the owner cancelled
    from outside: the owner's block finishes, zero VMs, zero tasks left, and
    every job ended with an output file saying it was cancelled."""
    sim = SimVMMS()
    before = _tasks()
    started = anyio.Event()
    box: dict[str, Any] = {}
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def owner() -> None:
                with scope:
                    try:
                        await _busy_manager(sim, fast, new_job, started, box)
                    except BaseException as e:
                        box["raised"] = e
                        raise

            tg.start_soon(owner)
            await started.wait()
            mgr: Manager = box["mgr"]
            if how == "close":
                await mgr.close()
                assert sim.live == {}  # done when close() returns
            elif how == "request_close":
                mgr.request_close()
            else:
                scope.cancel()
    # request_close and close end the block cleanly; a cancel ends it cancelled
    assert box.get("left", False) is (how != "cancel"), box.get("raised")
    assert sim.live == {}
    assert all(p.status().total == 0 and p._n_tasks == 0 for p in mgr.pools.values())
    assert _tasks() == before
    for h in box["handles"]:
        assert h.result is not None and h.result.outcome is Outcome.CANCELLED
        assert "cancelled" in Path(h.job.outputFile).read_text()


@pytest.mark.parametrize("how", ["close", "request_close"])
async def test_pool_ends_from_another_task(how: str) -> None:
    sim = SimVMMS()
    before = _tasks()
    left = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            pool = Pool(SPEC, sim, min_idle=2, max_size=3)

            async def owner() -> None:
                async with pool:
                    await pool.wait_until(lambda s: s.free == 2)
                    await anyio.sleep_forever()
                left.set()

            tg.start_soon(owner)
            await pool.wait_until(lambda s: s.free == 2)
            if how == "close":
                await pool.close()
                assert sim.live == {}
            else:
                pool.request_close()
            await left.wait()
    assert sim.live == {} and pool._n_tasks == 0 and _tasks() == before


async def test_an_exception_leaving_the_block_is_not_wrapped(fast: Settings) -> None:
    """The task group under the manager does not turn the body's own
    exception into an exception group."""
    sim = SimVMMS()
    with pytest.raises(KeyError, match="mine"):
        async with Manager(fast, drivers={"sim": sim}) as mgr:
            await mgr.ensure_pool("img.img", size=1)
            raise KeyError("mine")
    assert sim.live == {}
