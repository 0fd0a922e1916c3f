"""The scheduler and the job flow, through the Manager, on the sim driver."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import anyio
import pytest

from vmpool import (
    InputFile,
    JobError,
    JobHandle,
    Manager,
    Outcome,
    Settings,
    TangoMachine,
    UnknownImageError,
)
from vmpool_drivers.sim import FaultRule, SimVMMS, SimWorld

from .conftest import CTIME, JobFactory, autograder_re


def read(h: JobHandle) -> str:
    return Path(h.job.outputFile).read_text()


def lines(h: JobHandle) -> list[str]:
    return read(h).splitlines()


async def warm(mgr: Manager, image: str = "img.img", n: int | None = None) -> None:
    pool = await mgr.ensure_pool(image)
    target = pool.min_idle if n is None else n
    with anyio.fail_after(5):
        await pool.wait_until(lambda s: s.free >= target)


async def test_success_output_file_is_tangos(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS(output="hello\n")
    async with Manager(fast, drivers={"sim": sim}) as mgr:
        h = await mgr.submit(new_job(name="hello"))
        with anyio.fail_after(5):
            r = await h.wait()
    assert r.outcome is Outcome.SUCCESS and r.exit_status == 0 and r.retries == 0
    out = lines(h)
    assert re.fullmatch(autograder_re(f"Received job hello:{h.id}"), out[0])
    assert re.fullmatch(autograder_re("Success: Autodriver returned normally"), out[1])
    assert re.fullmatch(autograder_re("Here is the output from the autograder:"), out[2])
    assert out[3:] == ["---", "Autodriver: Job exited with status 0", "hello"]
    assert r.steps == {"waitvm": 0, "copyin": 0, "runjob": 0, "copyout": 0}
    # no temporary files are left beside the output
    assert sorted(p.name for p in Path(h.job.outputFile).parent.iterdir()) == [
        Path(h.job.outputFile).name
    ]
    assert sim.live == {}
    assert any("Assigned job hello" in t for t in h.job.trace)
    assert all(re.match(rf"{CTIME}\|", t) for t in h.job.trace)


async def test_empty_pool_of_one_image_does_not_delay_another(
    new_job: JobFactory, fast: Settings
) -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("initializeVM", "hang", image="a.img"))
    settings = fast.replace(initializevm_timeout=60)
    async with Manager(settings, drivers={"sim": sim}) as mgr:
        stuck = [await mgr.submit(new_job("a.img")) for _ in range(5)]
        t0 = time.monotonic()
        b_jobs = [await mgr.submit(new_job("b.img")) for _ in range(20)]
        with anyio.fail_after(5):
            for h in b_jobs:
                assert (await h.wait()).outcome is Outcome.SUCCESS
        elapsed = time.monotonic() - t0
        assert all(not h.done() for h in stuck)
        st = mgr.status()
        assert st["a"].waiting == 5 and st["a"].free == 0
    assert elapsed < 2.0
    # shutting down cancelled the stuck jobs, with an explanation
    for h in stuck:
        assert h.result is not None and h.result.outcome is Outcome.CANCELLED
        assert "Error: Job cancelled (vmpool is shutting down)" in read(h)
    assert sim.live == {}


async def test_runjob_timeout_cancels_and_destroys_vm(
    new_job: JobFactory, fast: Settings
) -> None:
    sim = SimVMMS()
    settings = fast.replace(runjob_grace=0.2)
    async with Manager(settings, drivers={"sim": sim}) as mgr:
        await warm(mgr)
        sim.add_fault(FaultRule("runJob", "hang", times=1))
        t0 = time.monotonic()
        h = await mgr.submit(new_job(timeout=1))
        with anyio.fail_after(5):
            r = await h.wait()
        took = time.monotonic() - t0
        assert r.outcome is Outcome.TIMEOUT and r.retries == 0
        assert 1.2 <= took < 1.2 + 0.5
        assert h.vm is not None
        with anyio.fail_after(5):
            await mgr.pools[h.pool.spec].wait_until(lambda s: s.destroying == 0)
        assert sim.instanceName(h.vm.id, h.vm.name) not in sim.live
        assert h.vm.id not in mgr.status()["img"].total_ids
        out = read(h)
        assert re.search(autograder_re("Error: Job timed out after 1 seconds"), out)
        assert "runJob did not return within 1.2 s" in out
        assert mgr.scheduler.counters.runjob_timeouts == 1
        assert sim.calls["copyOut"] == 0


async def test_autodriver_timeout_is_a_normal_result(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS(latency={"runJob": 5.0})
    async with Manager(fast, drivers={"sim": sim}) as mgr:
        h = await mgr.submit(new_job(timeout=0.2))
        with anyio.fail_after(5):
            r = await h.wait()
    assert r.outcome is Outcome.TIMEOUT and r.exit_status == 2 and r.retries == 0
    out = read(h)
    assert re.search(autograder_re("Error: Job timed out after 0.2 seconds"), out)
    assert out.endswith("---\nAutodriver: Job timed out after 0.2 seconds\n")


async def test_waitvm_timeout_retries_on_a_fresh_vm(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS()
    settings = fast.replace(waitvm_timeout=0.3)
    async with Manager(settings, drivers={"sim": sim}) as mgr:
        await warm(mgr)
        sim.add_fault(FaultRule("waitVM", "hang", times=1))
        h = await mgr.submit(new_job())
        with anyio.fail_after(5):
            r = await h.wait()
        assert r.outcome is Outcome.SUCCESS and r.retries == 1
        assert r.failures == ["Internal error: waitVM timeout after 0.3 secs"]
        assert mgr.scheduler.counters.waitvm_timeouts == 1
        assert mgr.scheduler.counters.job_retries == 1
        out = lines(h)
        assert re.fullmatch(
            autograder_re("Try 1 failed: Internal error: waitVM timeout after 0.3 secs"), out[1]
        )
        assert re.fullmatch(autograder_re("Success: Autodriver returned normally"), out[2])
        # two different VMs were used; the first is gone
        assigned = [t for t in h.job.trace if "Assigned job" in t]
        assert len(assigned) == 2 and assigned[0].split()[-1] != assigned[1].split()[-1]


async def test_retries_stop_at_job_retries(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("copyIn", "raise"))
    async with Manager(fast.replace(job_retries=2), drivers={"sim": sim}) as mgr:
        h = await mgr.submit(new_job())
        with anyio.fail_after(5):
            r = await h.wait()
        assert r.outcome is Outcome.INTERNAL_ERROR
        assert r.retries == 2 and len(r.failures) == 3
        assert sim.calls["copyIn"] == 3 and sim.calls["runJob"] == 0
        assert mgr.scheduler.counters.copyin_errors == 3
    out = lines(h)
    for i in range(3):
        assert re.fullmatch(
            autograder_re(
                f"Try {i + 1} failed: Error: Copy in to VM failed (status=-1): "
                "simulated copyIn failure"
            ),
            out[1 + i],
        )
    assert re.fullmatch(
        autograder_re("Internal error: Unable to complete job after 2 tries. Please resubmit"),
        out[4],
    )
    assert re.fullmatch(
        autograder_re("Job status: waitVM=0 copyIn=-1 runJob=None copyOut=None"), out[5]
    )
    assert out[6:] == [out[6], "---"] and "Here is the output" in out[6]
    assert sim.live == {}


@pytest.mark.parametrize(
    ("method", "action", "reason"),
    [
        ("runJob", "status", "Error: OS error while running job on VM"),
        ("runJob", "crash", "Internal error: runJob failed: RuntimeError: simulated driver bug"),
        ("copyOut", "raise", "Error: Copy out from VM failed (status=-1): simulated copyOut"),
        ("waitVM", "crash", "Internal error: VM local-"),
        ("copyIn", "hang", "Error: Copy in to VM failed (status=-1): timed out after 0.5 s"),
    ],
)
async def test_system_errors_are_retried_once_then_succeed(
    new_job: JobFactory, fast: Settings, method: str, action: str, reason: str
) -> None:
    sim = SimVMMS()
    async with Manager(fast, drivers={"sim": sim}) as mgr:
        await warm(mgr)
        sim.add_fault(FaultRule(method, action, times=1))  # type: ignore[arg-type]
        h = await mgr.submit(new_job())
        with anyio.fail_after(5):
            r = await h.wait()
    assert r.outcome is Outcome.SUCCESS and r.retries == 1
    assert r.failures[0].startswith(reason), r.failures
    assert sim.live == {}


async def test_failing_image_fails_its_jobs_with_an_explanation(
    new_job: JobFactory, fast: Settings
) -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("initializeVM", "raise", image="broken.img"))
    async with Manager(fast, drivers={"sim": sim}) as mgr:
        h = await mgr.submit(new_job("broken.img"))
        with anyio.fail_after(5):
            r = await h.wait()
        assert r.outcome is Outcome.INTERNAL_ERROR and len(r.failures) == 3
        assert all("initializeVM failed" in f for f in r.failures)
        assert mgr.status()["broken"].failed >= 3


async def test_cancel_queued_and_running_jobs(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("runJob", "hang"))
    settings = fast.replace(pool_size=1, runjob_timeout=60)
    async with Manager(settings, drivers={"sim": sim}) as mgr:
        running = await mgr.submit(new_job(name="running"))
        queued = await mgr.submit(new_job(name="queued"))
        with anyio.fail_after(5):
            await sim.wait_for_calls("runJob", 1)
        pool = running.pool
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.waiting == 1)
        assert queued.cancel("withdrawn by the student")
        with anyio.fail_after(5):
            rq = await queued.wait()
        assert rq.outcome is Outcome.CANCELLED
        assert re.search(autograder_re("Error: Job cancelled (withdrawn by the student)"),
                         read(queued))
        assert pool.status().waiting == 0
        assert not running.done()
        assert running.vm is not None
        vm_name = sim.instanceName(running.vm.id, running.vm.name)
        assert vm_name in sim.live
        running.cancel()
        with anyio.fail_after(5):
            rr = await running.wait()
        assert rr.outcome is Outcome.CANCELLED and rr.steps["runjob"] is None
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.destroying == 0)
        assert vm_name not in sim.live
        assert not running.cancel()  # already ended
    assert sim.live == {}


async def test_cancel_right_after_submit(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS()
    async with Manager(fast, drivers={"sim": sim}) as mgr:
        h = await mgr.submit(new_job())
        h.cancel()
        with anyio.fail_after(5):
            r = await h.wait()
    assert r.outcome is Outcome.CANCELLED
    assert sim.calls["runJob"] == 0


async def test_resize_while_jobs_run(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS(latency={"runJob": 0.02, "initializeVM": 0.002})
    async with Manager(fast.replace(pool_size=2), drivers={"sim": sim}) as mgr:
        handles = [await mgr.submit(new_job()) for _ in range(120)]
        pool = handles[0].pool
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.busy == 2)
        await mgr.resize("img.img", 8)
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.busy == 8)
        await mgr.resize("img.img", 1)
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.total <= 1)
        with anyio.fail_after(20):
            results = [await h.wait() for h in handles]
        assert all(r.outcome is Outcome.SUCCESS for r in results)
        with anyio.fail_after(5):
            st = await pool.wait_until(lambda s: s.free == 1 and s.destroying == 0)
        assert st.total == 1 and len(sim.live) == 1


async def test_close_leaves_no_vm_and_no_task(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS(latency={"runJob": "uniform:0,0.05", "initializeVM": 0.01})
    sim.add_fault(FaultRule("initializeVM", "hang", image="slow.img"))
    before = set(asyncio.all_tasks())
    done: list[int] = []
    async with Manager(fast.replace(pool_size=4), drivers={"sim": sim},
                       on_done=[lambda h: done.append(h.id)]) as mgr:
        handles = [await mgr.submit(new_job()) for _ in range(40)]
        handles += [await mgr.submit(new_job("slow.img")) for _ in range(3)]
        await mgr.ensure_pool("other.img", size=3)
        with anyio.fail_after(5):
            await sim.wait_for_calls("runJob", 5)
    assert sim.live == {}
    assert set(asyncio.all_tasks()) == before
    assert sorted(done) == sorted(h.id for h in handles)
    assert all(h.done() and Path(h.job.outputFile).is_file() for h in handles)
    for pool in mgr.pools.values():
        assert pool.status().total == 0 and pool._n_tasks == 0


async def test_bad_jobs_are_rejected_with_every_problem_named(
    new_job: JobFactory, fast: Settings, tmp_path: Path
) -> None:
    sim = SimVMMS(images=["img.img"])
    async with Manager(fast, drivers={"sim": sim}) as mgr:
        job = new_job()
        job.input = [
            InputFile(str(tmp_path / "missing.c"), "../../etc/x"),
            InputFile(str(tmp_path / "job" / "Makefile"), "/abs"),
        ]
        job.timeout = -1
        with pytest.raises(JobError) as err:
            await mgr.submit(job)
        text = str(err.value)
        for problem in (
            "destFile '../../etc/x' contains '..'",
            "destFile '/abs' is an absolute path",
            f"input file {tmp_path / 'missing.c'} does not exist",
            "no input file has destFile 'Makefile'",
            "timeout must be a number >= 0, got -1",
        ):
            assert problem in text
        with pytest.raises(UnknownImageError, match=r"unknown image 'nope\.img'"):
            await mgr.submit(new_job("nope.img"))
        assert mgr.scheduler.counters.job_requests == 0
    assert sim.calls["initializeVM"] == 0


async def test_orphans_of_a_crashed_run_are_destroyed(new_job: JobFactory, fast: Settings) -> None:
    world = SimWorld()
    crashed = SimVMMS(owner="me", world=world)
    for i in (3, 4, 5):
        await crashed.initializeVM(TangoMachine(name="img", image="img.img", id=i))
    await crashed.close()  # the crash: its VMs stay
    stranger = SimVMMS(owner="someone-else", world=world)
    await stranger.initializeVM(TangoMachine(name="img", image="img.img", id=1))
    assert len(world.live) == 4
    successor = SimVMMS(owner="me", world=world)
    async with Manager(fast, drivers={"sim": successor}) as mgr:
        # only the other owner's VM survived the start
        assert list(world.owners.values()) == ["someone-else"]
        h = await mgr.submit(new_job())
        with anyio.fail_after(5):
            await h.wait()
        # new VM ids do not collide with the earlier run's
        assert h.vm is not None and h.vm.id is not None and h.vm.id > 5
    assert list(world.owners.values()) == ["someone-else"]


async def test_every_job_ends_exactly_once_even_with_unexpected_errors(
    new_job: JobFactory, fast: Settings
) -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("copyOut", "crash"))
    ended: list[int] = []
    async with Manager(fast, drivers={"sim": sim}, on_done=[lambda h: ended.append(h.id)]) as mgr:
        handles = [await mgr.submit(new_job()) for _ in range(10)]
        with anyio.fail_after(10):
            for h in handles:
                r = await h.wait()
                assert r.outcome is Outcome.INTERNAL_ERROR
                assert "RuntimeError: simulated driver bug in copyOut" in read(h)
    assert sorted(ended) == [h.id for h in handles]


async def test_manager_cancelled_from_outside_closes_and_leaks_nothing(
    new_job: JobFactory, fast: Settings
) -> None:
    sim = SimVMMS(latency={"initializeVM": 1.0, "runJob": 5.0})
    handles: list[JobHandle] = []
    # (the bound covers the cancelled job's output file, fsynced on this
    # machine's disk: seconds, and over 10 s once when the disk was busy)
    with anyio.fail_after(60):
        with anyio.move_on_after(0.3) as outer:
            async with Manager(fast.replace(pool_size=2, runjob_timeout=30),
                               drivers={"sim": sim}) as mgr:
                handles.append(await mgr.submit(new_job()))
                await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert sim.live == {}
    assert all(p.status().total == 0 for p in mgr.pools.values())


async def test_a_job_id_already_live_is_refused(new_job: JobFactory, fast: Settings) -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("runJob", "hang", times=1))
    async with Manager(fast.replace(runjob_timeout=30), drivers={"sim": sim}) as mgr:
        h = await mgr.submit(new_job())
        again = new_job()
        again.id = h.id
        with pytest.raises(JobError, match=f"job {h.id} is already queued or running"):
            await mgr.submit(again)
        h.cancel()
        with anyio.fail_after(5):
            assert (await h.wait()).outcome is Outcome.CANCELLED
