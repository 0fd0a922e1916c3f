"""The pool on its own: warm VMs, event-driven refill, backoff, resize, close."""

from __future__ import annotations

from contextlib import AsyncExitStack

import anyio
import pytest

from vmpool import InitializeVMError, Pool, PoolClosedError, PoolSpec
from vmpool_drivers.sim import FaultRule, SimVMMS

SPEC = PoolSpec("img.img", "sim")


def make_pool(sim: SimVMMS, **kw: object) -> Pool:
    opts: dict[str, object] = {
        "min_idle": 2,
        "initializevm_timeout": 1.0,
        "waitvm_timeout": 1.0,
        "destroy_timeout": 0.5,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
    }
    opts.update(kw)
    return Pool(SPEC, sim, **opts)  # type: ignore[arg-type]


async def test_fills_to_min_idle_with_ready_vms() -> None:
    sim = SimVMMS(latency={"initializeVM": 0.01})
    async with make_pool(sim, min_idle=3, max_size=5) as pool:
        with anyio.fail_after(5):
            st = await pool.wait_until(lambda s: s.free == 3)
        assert st.total == 3 and st.creating == 0 and st.busy == 0
        assert len(sim.live) == 3
        # every warm VM went through initializeVM and waitVM
        assert sim.calls["initializeVM"] == 3 and sim.calls["waitVM"] == 3
    assert sim.live == {}


async def test_taking_a_vm_starts_its_replacement_at_once() -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("initializeVM", "hang", times=None))
    pool = make_pool(sim, min_idle=2, max_size=3, initializevm_timeout=30)
    async with pool:
        # nothing becomes ready: 2 creations are under way, no more
        st = pool.status()
        assert st.creating == 2
        sim.clear_faults()
    sim2 = SimVMMS()
    async with make_pool(sim2, min_idle=2, max_size=3) as pool:
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.free == 2)
        async with pool.lease():
            # the replacement was started by taking the VM: no timer, no poll
            st = pool.status()
            assert st.busy == 1 and st.free + st.creating == 2
    assert sim2.live == {}


async def test_creation_concurrency_is_bounded() -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("initializeVM", "hang"))
    async with make_pool(sim, min_idle=10, max_size=10, create_concurrency=3,
                         initializevm_timeout=30) as pool:
        with anyio.fail_after(5):
            await sim.wait_for_calls("initializeVM", 3)
        st = pool.status()
        assert st.creating == 3
        assert sim.calls["initializeVM"] == 3
    # the cancelled creations were cleaned up
    assert sim.live == {}


async def test_one_shot_vm_is_destroyed_and_replaced() -> None:
    sim = SimVMMS()
    async with make_pool(sim, min_idle=1) as pool:
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.free == 1)
        async with pool.lease() as lease:
            first = lease.vm.id
            lease.healthy = True
        with anyio.fail_after(5):
            st = await pool.wait_until(lambda s: s.free == 1 and s.destroying == 0)
        assert first not in st.free_ids
        assert sim.instanceName(first, SPEC.name) not in sim.live
        assert len(sim.live) == 1


async def test_reuse_returns_only_healthy_vms() -> None:
    sim = SimVMMS()
    async with make_pool(sim, min_idle=1, reuse=True) as pool:
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.free == 1)
        async with pool.lease() as lease:
            kept = lease.vm.id
            lease.healthy = True
        assert pool.status().free_ids == [kept]
        async with pool.lease() as lease:
            assert lease.vm.id == kept  # not healthy: destroyed after the block
        with anyio.fail_after(5):
            st = await pool.wait_until(lambda s: s.free == 1 and s.destroying == 0)
        assert st.free_ids != [kept]
        assert sim.instanceName(kept, SPEC.name) not in sim.live


async def test_failed_creations_back_off_and_show_in_status() -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("initializeVM", "raise"))
    async with make_pool(sim, min_idle=2, backoff_initial=0.2, backoff_max=0.2) as pool:
        with anyio.fail_after(5):
            st = await pool.wait_until(lambda s: s.failed >= 2 and s.destroying == 0)
        assert st.consecutive_failures >= 2
        assert st.last_error is not None and "simulated initializeVM failure" in st.last_error
        # while backing off, nothing new is tried
        st = pool.status()
        assert st.backoff_remaining > 0
        calls = sim.calls["initializeVM"]
        assert st.creating == 0
        assert sim.calls["initializeVM"] == calls
        # the failed VMs were destroyed, not left behind
        assert sim.live == {}
        sim.clear_faults()
        with anyio.fail_after(5):
            st = await pool.wait_until(lambda s: s.free == 2)
        assert st.consecutive_failures == 0


async def test_waiting_job_gets_the_creation_error() -> None:
    sim = SimVMMS()
    sim.add_fault(FaultRule("initializeVM", "raise"))
    async with make_pool(sim, min_idle=0, max_size=1) as pool:
        with anyio.fail_after(5), pytest.raises(InitializeVMError):
            async with pool.lease():
                pass


async def test_resize_up_and_down() -> None:
    sim = SimVMMS(latency={"initializeVM": 0.005})
    async with make_pool(sim, min_idle=1) as pool:
        pool.resize(6)
        assert pool.max_size == 6
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.free == 6)
        assert len(sim.live) == 6
        async with pool.lease() as busy:
            busy.healthy = True
            pool.resize(2)
            with anyio.fail_after(5):
                st = await pool.wait_until(lambda s: s.total == 2 and s.destroying == 0)
            # the busy VM is kept until its job ends; it is destroyed then
            assert st.busy == 1 and st.free == 1
        with anyio.fail_after(5):
            st = await pool.wait_until(lambda s: s.free == 2 and s.destroying == 0)
        assert len(sim.live) == 2
        pool.resize(0)
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.total == 0 and s.destroying == 0)
        assert sim.live == {}
        with pytest.raises(ValueError, match="size must be an int >= 0"):
            pool.resize(-1)


async def test_close_destroys_everything_and_fails_waiters() -> None:
    sim = SimVMMS()
    pool = make_pool(sim, min_idle=1, max_size=3)
    result: list[BaseException] = []

    async def waiter() -> None:
        try:
            async with pool.lease():
                pass
        except PoolClosedError as e:
            result.append(e)

    async with pool, AsyncExitStack() as held:
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.free == 1)
        await held.enter_async_context(pool.lease())
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.free == 1)
        # a creation hangs, a job waits, two VMs are held past the close
        sim.add_fault(FaultRule("initializeVM", "hang"))
        await held.enter_async_context(pool.lease())
        with anyio.fail_after(5):
            await sim.wait_for_calls("initializeVM", 3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            with anyio.fail_after(5):
                st = await pool.wait_until(lambda s: s.waiting == 1)
            assert st.busy == 2 and st.creating == 1
            with anyio.fail_after(5):
                await pool.close(busy_grace=0.2)
        assert len(result) == 1 and "closed" in str(result[0])
    assert sim.live == {}
    assert pool.status().total == 0
    assert pool._n_tasks == 0
    with pytest.raises(PoolClosedError):
        async with pool.lease():
            pass


async def test_cancelled_waiter_leaves_the_line() -> None:
    sim = SimVMMS()
    async with make_pool(sim, min_idle=0, max_size=1, reuse=True) as pool, \
            AsyncExitStack() as holding:
        first = await holding.enter_async_context(pool.lease())
        first.healthy = True
        got: list[int | None] = []
        scopes: list[anyio.CancelScope] = []

        async def take_cancellable() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                async with pool.lease():
                    got.append(-1)

        async def take() -> None:
            async with pool.lease() as lease:
                got.append(lease.vm.id)
                lease.healthy = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(take_cancellable)
            with anyio.fail_after(5):
                await pool.wait_until(lambda s: s.waiting == 1)
            tg.start_soon(take)
            with anyio.fail_after(5):
                await pool.wait_until(lambda s: s.waiting == 2)
            # The first waiter gives up: the VM must go to the second one, and
            # the cancelled waiter must not count as waiting any more.
            scopes[0].cancel()
            with anyio.fail_after(5):
                await pool.wait_until(lambda s: s.waiting == 1)
            vm_id = first.vm.id
            await holding.aclose()  # the held VM goes back: the waiter left gets it
        assert got == [vm_id]
        st = pool.status()
        assert st.waiting == 0 and st.busy == 0


def test_constructor_names_bad_values() -> None:
    sim = SimVMMS()
    with pytest.raises(ValueError, match=r"min_idle must be an int >= 0, got -1"):
        Pool(SPEC, sim, min_idle=-1)
    with pytest.raises(ValueError, match=r"max_size \(1\) must be >= min_idle \(3\)"):
        Pool(SPEC, sim, min_idle=3, max_size=1)
    with pytest.raises(ValueError, match=r"create_concurrency must be an int >= 1"):
        Pool(SPEC, sim, create_concurrency=0)


async def test_spec_names() -> None:
    assert PoolSpec("rhel.img", "sim").name == "rhel"
    assert PoolSpec("rhel.img", "sim").key == "rhel"
    assert PoolSpec("rhel.img", "sim", cores=2, memory=512).key == "rhel[cores=2,memory=512]"


async def test_drain_destroys_everything_and_keeps_the_pool_usable() -> None:
    sim = SimVMMS()
    async with make_pool(sim, min_idle=3, max_size=3, reuse=True) as pool:
        with anyio.fail_after(5):
            await pool.wait_until(lambda s: s.free == 3)
        async with anyio.create_task_group() as tg, pool.lease() as held:
            held.healthy = True  # reuse is off while draining: destroyed all the same
            tg.start_soon(pool.drain)
            with anyio.fail_after(5):
                # idle VMs go at once; the busy one is waited for
                await pool.wait_until(
                    lambda s: s.free == 0 and s.destroying == 0 and s.busy == 1)
            assert len(sim.live) == 1
        st = pool.status()
        assert st.total == 0 and sim.live == {} and pool.reuse
        # still open: a job gets a VM made on demand
        with anyio.fail_after(5):
            async with pool.lease():
                pass


class _CountingSim(SimVMMS):
    """The sim driver, noting how many VMs are alive each time one is made."""

    peak = 0

    async def initializeVM(self, vm):  # type: ignore[no-untyped-def]
        await super().initializeVM(vm)
        self.peak = max(self.peak, len(self.live))


async def test_max_size_caps_live_vms_when_destroying_is_slow() -> None:
    """Destruction slower than creation plus a job (EC2, a busy engine): the
    VMs being destroyed count against max_size, so no more than max_size VMs
    are ever alive, and every job still gets one."""
    sim = _CountingSim(latency={"initializeVM": 0.01, "destroyVM": 0.2})
    async with make_pool(sim, min_idle=2, max_size=2, destroy_timeout=5.0) as pool:
        async def job() -> None:
            async with pool.lease() as lease:
                lease.healthy = True  # one-shot: destroyed after its job all the same

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(job)
    assert sim.peak <= 2, f"{sim.peak} VMs alive at once with max_size=2"
    assert sim.calls["initializeVM"] >= 30 and sim.live == {}


async def test_idle_timeout_keeps_extra_vms_then_shrinks_to_min_idle() -> None:
    # A burst of 3 jobs grew the pool past its warm size (1); with
    # idle_timeout the extra VMs stay warm for the next burst, and only
    # after the timeout does the pool shrink back to min_idle. Without it
    # (idle_timeout=0) the extras go at once.
    for idle_timeout in (0.4, 0.0):
        sim = SimVMMS()
        async with make_pool(sim, min_idle=1, max_size=4, reuse=True,
                             idle_timeout=idle_timeout) as pool:
            async with AsyncExitStack() as stack:
                leases = [await stack.enter_async_context(pool.lease()) for _ in range(3)]
                for lease in leases:
                    lease.healthy = True
            st = pool.status()
            if idle_timeout:
                # the 3 back from their jobs and the warm one made meanwhile:
                # kept for the next burst
                assert st.free == 4 and st.destroying == 0, st
                assert st.to_dict()["idle_timeout"] == idle_timeout
                with anyio.fail_after(5):
                    st = await pool.wait_until(lambda s: s.free == 1 and s.destroying == 0)
                assert st.total == 1 and len(sim.live) == 1
            else:
                assert st.free == 1, st  # shrunk at once


async def test_adaptive_settings_make_adaptive_pools() -> None:
    from vmpool import Manager, Settings

    s = Settings(default_vmms="sim", pool_size=1, pool_max_size=6, adaptive=True,
                 adaptive_margin=1.5, adaptive_hold=60)
    async with Manager(s, drivers={"sim": SimVMMS()}) as mgr:
        pool = await mgr.ensure_pool("img.img")
        assert pool.adaptive is not None
        assert (pool.adaptive.low, pool.adaptive.high, pool.adaptive.margin,
                pool.adaptive.hold) == (1, 6, 1.5, 60)
        # no arrival yet: the target is the floor
        assert pool.idle_target() == 1
    async with Manager(Settings(default_vmms="sim"), drivers={"sim": SimVMMS()}) as mgr:
        assert (await mgr.ensure_pool("img.img")).adaptive is None  # off by default


def test_the_waiting_line_takes_courselabs_in_turn() -> None:
    from vmpool.pool import _Line, _Waiter

    line = _Line(weights={"big": 2})
    ws = {name: [_Waiter(name) for _ in range(4)] for name in ("big", "small", "other")}
    for i in range(4):
        for name in ("big", "small", "other"):
            line.add(ws[name][i])
    retried = _Waiter("other")
    line.add(retried, front=True)  # a retry: the front of its line, its key's turn now
    line.remove(ws["small"][1])  # a cancelled waiter leaves
    order = []
    while (w := line.pop()) is not None:
        order.append((w.key, w))
    assert len(order) == 12 and len(line) == 0
    assert order[0][1] is retried
    keys = [k for k, _ in order]
    # "big" is served twice per turn (its weight), the others once, FIFO within each
    assert keys[:7] == ["other", "big", "big", "small", "other", "big", "big"]
    assert [w for k, w in order if k == "small"] == [ws["small"][0], ws["small"][2],
                                                     ws["small"][3]]
