"""The driver conformance suite (issue 10, point 4): one set of rules every
VMMS driver must keep, each guarded by a test of its own name.

A driver joins with a module ``tests/test_contract_<driver>.py`` holding

    import pytest

    pytest.register_assert_rewrite("tests.driver_contract")  # readable failures

    from .driver_contract import *  # noqa: E402, F403
    from .driver_contract import Target  # noqa: E402

    @pytest.fixture
    async def contract_target(tmp_path: Path) -> Target:
        ...  # how to build the driver, its image, what "left on the host" means

and nothing else: every ``test_*`` function below is then collected in that
module, run against that driver, and a broken rule fails the test named
after it (``tests/test_contract_local.py::test_timeout``). A driver that
needs a service (an engine, an SSH host, a cloud account) gets it in that
fixture, and fails there, loudly, when the service is missing: never a skip.

The suite talks to drivers only through the public VMMS API
(:mod:`vmpool.vmms`) and, where a rule is about a manager, through
:class:`vmpool.Manager`. It knows nothing of any driver: what is driver
specific is in the :class:`Target` (``leftovers``: what of a driver's owner
is still on the host; ``reports_partial_output``: whether "the job is
running" can be seen through ``partialOutput``).

Every driver runs the same jobs (:func:`uniform_job`): a Makefile, and a
``sim-job.json`` that describes the same behaviour to the sim driver (which
does not run Makefiles). For the sim, rules about what a job prints only
show that copyOut hands back the feedback runJob made; for real drivers
they show the job really ran.

Nothing waits by sleeping: each wait is on an event or an observable
condition, bounded by ``anyio.fail_after``. Each driver a test makes is
closed afterwards and each owner's VMs removed (the ``contract`` fixture),
so a failing test leaks nothing into the next.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from vmpool import (
    VMMS,
    CopyOutError,
    InitializeVMError,
    InputFile,
    JobError,
    Manager,
    Outcome,
    TangoMachine,
    UnknownImageError,
    VMMSError,
    make_job,
)
from vmpool.models import pool_name

from .jobs import ELISION, driver_test_settings, finish

#: the most a VM's creation and readiness may take (a cold container, an EC2 boot)
CREATE_LIMIT = 120.0
#: the most one short VMMS call (copyIn, a short runJob, copyOut, destroyVM) may take
CALL_LIMIT = 60.0
#: a cancelled runJob must have returned (and its work stopped) within this
CANCEL_LIMIT = 10.0
MARKER = "contract-job-started"
#: what the feedback of a successful job starts with
STATUS_0 = b"Autodriver: Job exited with status 0\n"
_slots = itertools.count()


# --------------------------------------------------------------------------
# What a driver's module provides


@dataclass
class Target:
    """One driver under test, as its ``contract_target`` fixture builds it.

    ``make_driver(owner=...)``: a new, ready driver instance of that owner
    (several at once, of one or more owners, share one "host": one state
    directory, engine, cloud account or sim world).

    ``leftovers(driver)``: what of ``driver.owner``'s VMs is still on that
    host (sandbox directories, uid claims and processes, containers, live
    instances), one readable line each; empty when nothing is. Called with
    live and closed drivers; it must see a VM that exists (the suite checks
    that, so an empty hook cannot pass for a clean host).

    ``reports_partial_output``: whether ``partialOutput`` shows what a running
    job has printed; if not, "the job is running" is "runJob was entered".
    """

    name: str
    image: str
    make_driver: Callable[..., Awaitable[VMMS]]
    leftovers: Callable[[Any], Awaitable[list[str]]]
    reports_partial_output: bool = True
    #: extra vmpool.Settings for the manager rules (deadlines, ...)
    manager_settings: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Uniform jobs


def uniform_job(
    d: Path,
    output: str,
    *,
    recipe_exit: int = 0,
    seconds: float = 0,
    recipe: str | None = None,
    files: dict[str, bytes] | None = None,
) -> list[InputFile]:
    """A job in directory ``d`` that prints ``output``, then sleeps
    ``seconds``, then ends with ``recipe_exit``: a Makefile (``cat out.txt``,
    or ``recipe``, which must print exactly ``output``) and ``sim-job.json``
    saying the same to the sim. ``files``: more input files, by destFile.

    GNU make exits 2 when a recipe fails, whatever the recipe's code, and
    says ``make: *** [Makefile:2: all] Error N`` on stderr (which the
    autodriver captures with stdout): the sim is told exactly that.
    """
    d.mkdir(parents=True)
    (d / "out.txt").write_bytes(output.encode())
    steps = [recipe or "cat out.txt"]
    if seconds:
        steps.append(f"sleep {seconds:g}")
    if recipe_exit:
        steps.append(f"exit {recipe_exit}")
    (d / "Makefile").write_text("all:\n\t@" + "; ".join(steps) + "\n")
    sim_output = output
    if recipe_exit:
        sim_output += f"make: *** [Makefile:2: all] Error {recipe_exit}\n"
    (d / "sim-job.json").write_text(json.dumps({
        "output": sim_output,
        "make_status": 2 if recipe_exit else 0,
        "seconds": seconds,
        "exit": None,
    }))
    inputs = [InputFile(str(d / "Makefile"), "Makefile"),
              InputFile(str(d / "out.txt"), "out.txt"),
              InputFile(str(d / "sim-job.json"), "sim-job.json")]
    for i, (dest, data) in enumerate((files or {}).items()):
        src = d / f"input-{i}"
        src.write_bytes(data)
        inputs.append(InputFile(str(src), dest))
    return inputs


# --------------------------------------------------------------------------
# A recording wrapper (no subclass: it delegates everything)

RECORDED = frozenset({
    "initializeVM", "waitVM", "copyIn", "runJob", "copyOut", "destroyVM", "safeDestroyVM",
    "getVMs", "getOrphans", "getImages", "partialOutput",
})
#: the calls that touch (or make) a VM
VM_CALLS = frozenset({"initializeVM", "waitVM", "copyIn", "runJob", "copyOut", "destroyVM",
                      "safeDestroyVM"})


class Recording:
    """A driver, with every VMMS call it gets noted (method, VM) before it is
    passed on. Everything else is the driver's own (attributes, close)."""

    def __init__(self, inner: VMMS) -> None:
        self.inner = inner
        self.calls: list[tuple[str, TangoMachine | None]] = []
        self._changed = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in RECORDED:
            return attr

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            vm = args[0] if args and isinstance(args[0], TangoMachine) else None
            self.calls.append((name, vm))
            self._changed.set()
            self._changed = anyio.Event()
            return await attr(*args, **kwargs)

        return recorded

    def called(self, *methods: str) -> list[str]:
        return [m for m, _ in self.calls if m in methods]

    async def wait_call(self, method: str, n: int) -> TangoMachine | None:
        """Wait until ``method`` was called ``n`` times; the VM of the n-th call."""
        while True:
            vms = [vm for m, vm in self.calls if m == method]
            if len(vms) >= n:
                return vms[n - 1]
            await self._changed.wait()

    def __repr__(self) -> str:
        return f"<Recording {self.inner!r}>"


# --------------------------------------------------------------------------
# The fixture every rule uses


class Contract:
    """One test's drivers, owners, VM ids and job directories."""

    def __init__(self, target: Target, tmp: Path) -> None:
        self.target = target
        self.tmp = tmp
        self.slot = next(_slots)
        self.drivers: list[Recording] = []
        self.owners: list[str] = []
        self._ids = itertools.count(1)
        self._jobs = itertools.count(1)

    def owner(self, tag: str) -> str:
        """A fresh owner id, unique to this test (and process)."""
        o = f"ct{self.slot}{tag}-{os.getpid()}"
        if o not in self.owners:
            self.owners.append(o)
        return o

    async def driver(self, owner: str | None = None) -> Recording:
        owner = owner or self.owner("a")
        if owner not in self.owners:
            self.owners.append(owner)
        with anyio.fail_after(CALL_LIMIT):
            drv = Recording(await self.target.make_driver(owner=owner))
        assert drv.owner == owner, f"make_driver(owner={owner!r}) made one of {drv.owner!r}"
        self.drivers.append(drv)
        return drv

    def vm(self, image: str | None = None, id: int | None = None) -> TangoMachine:
        image = image or self.target.image
        return TangoMachine(name=pool_name(image), image=image,
                            id=id if id is not None else next(self._ids))

    async def ready_vm(self, drv: Any, vm: TangoMachine | None = None) -> TangoMachine:
        vm = vm or self.vm()
        with anyio.fail_after(CREATE_LIMIT):
            await drv.initializeVM(vm)
            await drv.waitVM(vm, CREATE_LIMIT)
        return vm

    def job(self, output: str, **kw: Any) -> list[InputFile]:
        return uniform_job(self.tmp / "jobs" / f"job{next(self._jobs)}", output, **kw)

    def out(self, name: str = "feedback") -> Path:
        d = self.tmp / "out"
        d.mkdir(exist_ok=True)
        return d / f"{name}-{next(self._jobs)}"

    async def run(
        self, drv: Any, vm: TangoMachine, files: list[InputFile], *,
        run_timeout: float = 20, max_output: int = 1_000_000,
    ) -> tuple[int, bytes]:
        """copyIn, runJob, copyOut: (runJob's status, the feedback copied out)."""
        dest = self.out()
        with anyio.fail_after(CALL_LIMIT + run_timeout):
            await drv.copyIn(vm, files)
            status = await drv.runJob(vm, run_timeout, max_output, True)
            await drv.copyOut(vm, str(dest))
        return status, dest.read_bytes()

    async def wait_running(self, drv: Recording, vm: TangoMachine, n: int = 1) -> None:
        """Wait until the job on ``vm`` (the n-th runJob of ``drv``) is running:
        it has printed MARKER, as partialOutput shows (else: runJob entered)."""
        with anyio.fail_after(CALL_LIMIT):
            await drv.wait_call("runJob", n)
            if not self.target.reports_partial_output:
                return
            while True:
                seen = await drv.partialOutput(vm)
                if seen is not None and MARKER.encode() in seen:
                    return
                await anyio.sleep(0.05)  # polling an observable, bounded above

    def settings(self, **kw: Any) -> Any:
        return driver_test_settings(self.target.name, **{**self.target.manager_settings, **kw})

    async def leftovers(self, drv: Any) -> list[str]:
        with anyio.fail_after(CALL_LIMIT):
            return await self.target.leftovers(drv)

    async def teardown(self) -> None:
        """Close every driver; remove what any owner of the test still has."""
        with anyio.fail_after(CREATE_LIMIT):
            for drv in self.drivers:
                await drv.close()
            left: dict[str, list[str]] = {}
            for owner in self.owners:
                drv = Recording(await self.target.make_driver(owner=owner))
                try:
                    for vm in await drv.getVMs():
                        with contextlib.suppress(Exception):
                            await drv.destroyVM(vm)
                finally:
                    await drv.close()
                rest = await self.target.leftovers(drv)
                if rest:
                    left[owner] = rest
        assert left == {}, f"could not clean up after the test: {left}"


@pytest.fixture
async def contract(contract_target: Target, tmp_path: Path) -> AsyncIterator[Contract]:
    c = Contract(contract_target, tmp_path)
    try:
        yield c
    finally:
        await c.teardown()


def ids_of(vms: list[TangoMachine]) -> list[str | None]:
    return sorted((vm.instance_id for vm in vms), key=str)


def first_line(feedback: bytes) -> bytes:
    return feedback.split(b"\n", 1)[0]


# --------------------------------------------------------------------------
# The rules


async def test_lifecycle(contract: Contract) -> None:
    """initializeVM + waitVM make a VM that getVMs lists (by instance_id, id and
    name) and leftovers sees; destroyVM removes it from both. Destroying a VM
    that is gone is a no-op: destroyVM and safeDestroyVM again do not raise
    (what every driver does: the pool may destroy a VM twice, and a VM whose
    creation failed half-way is destroyed whatever it got to)."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    assert vm.instance_id, "initializeVM did not set vm.instance_id"
    listed = await drv.getVMs()
    assert [(v.instance_id, v.id, v.name) for v in listed] == [(vm.instance_id, vm.id, vm.name)]
    assert await contract.leftovers(drv) != [], "leftovers() does not see a live VM"
    with anyio.fail_after(CALL_LIMIT):
        await drv.destroyVM(vm)
    assert await drv.getVMs() == []
    assert await contract.leftovers(drv) == []
    with anyio.fail_after(CALL_LIMIT):
        await drv.safeDestroyVM(vm)
        await drv.destroyVM(vm)
    assert await drv.getVMs() == []


async def test_copy_binary_roundtrip(contract: Contract) -> None:
    """copyIn copies files byte for byte, into subdirectories it makes and
    under names with spaces; copyOut writes runJob's feedback, exactly, to
    destFile on the host (status line first, then the job's output). For the
    sim the job's output is described, not computed: there the rule only
    shows that copyOut hands back the feedback."""
    blob = bytes(range(256)) * 64
    other = bytes(reversed(range(256))) + b"\x00\r\n\xff"
    text = "naïve ✓ 日本語\n".encode()
    expected = (
        f"{hashlib.md5(blob).hexdigest()}  data.bin\n"
        f"{hashlib.md5(other).hexdigest()}  sub/x.bin\n"
        f"{hashlib.md5(text).hexdigest()}  a b/c d.txt\n"
        "naïve ✓ 日本語\n"
    )
    files = contract.job(
        expected,
        recipe="md5sum data.bin sub/x.bin 'a b/c d.txt' && cat 'a b/c d.txt'",
        files={"data.bin": blob, "sub/x.bin": other, "a b/c d.txt": text},
    )
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    status, feedback = await contract.run(drv, vm, files)
    assert status == 0, feedback
    assert feedback == STATUS_0 + expected.encode()


async def test_copyout_without_runjob_raises_copyout_error(contract: Contract) -> None:
    """copyOut on a VM that ran no job raises CopyOutError and writes nothing
    (an empty or stale file would pass for the job's feedback)."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    dest = contract.out()
    with anyio.fail_after(CALL_LIMIT), pytest.raises(CopyOutError):
        await drv.copyOut(vm, str(dest))
    assert not dest.exists()


async def run_without_copyout(contract: Contract, drv: Any, vm: TangoMachine,
                              output: str) -> int:
    with anyio.fail_after(CALL_LIMIT):
        await drv.copyIn(vm, contract.job(output))
        return int(await drv.runJob(vm, 20, 1_000_000, True))


async def test_copyout_takes_the_feedback(contract: Contract) -> None:
    """runJob leaves its feedback in ``vm.feedback``; copyOut takes it
    (``vm.feedback`` is None afterwards): a second copyOut raises
    CopyOutError and writes nothing, the first destFile keeps the feedback."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    assert await run_without_copyout(contract, drv, vm, "taken once\n") == 0
    assert vm.feedback is not None, "runJob returned a status but set no vm.feedback"
    first, second = contract.out(), contract.out()
    with anyio.fail_after(CALL_LIMIT):
        await drv.copyOut(vm, str(first))
    assert vm.feedback is None
    with anyio.fail_after(CALL_LIMIT), pytest.raises(CopyOutError):
        await drv.copyOut(vm, str(second))
    assert not second.exists()
    assert first.read_bytes() == STATUS_0 + b"taken once\n"


async def test_copyout_failure_takes_the_feedback(contract: Contract) -> None:
    """copyOut to a destFile that cannot be written raises CopyOutError, and
    the feedback is taken all the same: ``vm.feedback`` is None, a spooled
    feedback file is gone."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    assert await run_without_copyout(contract, drv, vm, "lost\n") == 0
    assert vm.feedback is not None, "runJob returned a status but set no vm.feedback"
    spooled = vm.feedback.path if vm.feedback.spooled else None
    with anyio.fail_after(CALL_LIMIT), pytest.raises(CopyOutError):
        await drv.copyOut(vm, str(contract.tmp / "no-such-dir" / "feedback"))
    assert vm.feedback is None
    assert spooled is None or not spooled.exists(), f"spool file {spooled} left"


async def test_destroy_discards_feedback_never_copied_out(contract: Contract) -> None:
    """A VM destroyed with a feedback never copied out leaves nothing of it:
    ``vm.feedback`` is None and its file (spooled or the VM's) is gone."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    assert await run_without_copyout(contract, drv, vm, "never copied out\n") == 0
    assert vm.feedback is not None, "runJob returned a status but set no vm.feedback"
    path = vm.feedback.path
    with anyio.fail_after(CALL_LIMIT):
        await drv.destroyVM(vm)
    assert vm.feedback is None
    assert path is None or not path.exists(), f"feedback file {path} left"
    assert await contract.leftovers(drv) == []


async def test_second_job_on_a_vm_gets_its_own_feedback(contract: Contract) -> None:
    """A VM runs jobs one after another (a reused VM): each copyOut gives the
    feedback of the runJob just before it, never an earlier job's."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    s1, f1 = await contract.run(drv, vm, contract.job("first job\n"))
    s2, f2 = await contract.run(drv, vm, contract.job("second job\n"))
    assert (s1, s2) == (0, 0), (f1, f2)
    assert f1 == STATUS_0 + b"first job\n"
    assert f2 == STATUS_0 + b"second job\n"


async def test_dest_file_refused(contract: Contract) -> None:
    """A destFile outside the job directory ("../x", "/etc/x", "a\\nb") is
    refused when the job is submitted (JobError naming it), and no VMMS call
    is made for it; a good job then runs through the same driver (so the
    recording does see the manager's calls)."""
    drv = await contract.driver()
    async with Manager(contract.settings(pool_size=0), drivers={contract.target.name: drv},
                       owner=drv.owner) as mgr:
        for bad in ("../x", "/etc/x", "a\nb"):
            files = contract.job("never\n")
            files.append(InputFile(files[0].localFile, bad))
            job = make_job(contract.target.image, files, str(contract.out("refused")),
                           name="refused", timeout=20)
            with pytest.raises(JobError) as caught:
                await mgr.submit(job)
            assert repr(bad) in str(caught.value), str(caught.value)
        assert drv.called(*VM_CALLS) == []
        assert not mgr.inventory()
        out = contract.out("good")
        h = await mgr.submit(make_job(contract.target.image, contract.job("good job\n"),
                                      str(out), name="good", timeout=20))
        r = await finish(h, CREATE_LIMIT)
    assert r.outcome is Outcome.SUCCESS, out.read_text(errors="replace")
    assert "good job" in out.read_text()
    assert drv.called("copyIn") != []


async def test_exit_status_and_make_failure(contract: Contract) -> None:
    """A failing make is the job's result, not the VM's: runJob returns 0 and
    the feedback's first line gives make's status (GNU make exits 2 when a
    recipe fails), then the job's output and make's "Error 3"."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    status, feedback = await contract.run(drv, vm, contract.job("before failing\n",
                                                                recipe_exit=3))
    assert status == 0, feedback
    assert first_line(feedback) == b"Autodriver: Job exited with status 2", feedback
    assert b"\nbefore failing\n" in feedback
    assert b"Error 3" in feedback


async def test_timeout(contract: Contract) -> None:
    """A job running past runTimeout is stopped then: runJob returns 2 (not
    before runTimeout, well within its grace) and the feedback's first line
    says it timed out."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    files = contract.job(f"{MARKER}\n", seconds=30)
    dest = contract.out()
    with anyio.fail_after(CALL_LIMIT):
        await drv.copyIn(vm, files)
    start = anyio.current_time()
    with anyio.fail_after(20):
        status = await drv.runJob(vm, 1, 1_000_000, True)
    took = anyio.current_time() - start
    with anyio.fail_after(CALL_LIMIT):
        await drv.copyOut(vm, str(dest))
    feedback = dest.read_bytes()
    assert status == 2, feedback
    assert first_line(feedback) == b"Autodriver: Job timed out after 1 seconds", feedback
    assert took >= 0.95, f"runJob returned after {took:.2f} s, before the 1 s timeout"


async def test_output_cap(contract: Contract) -> None:
    """Output beyond maxOutputFileSize is cut in the middle: the feedback is
    about maxOutputFileSize long (plus the status line and the marker), keeps
    the first and the last part, and says "...[excess bytes elided]...",
    exactly Tango's marker."""
    cap = 10_000
    line = "0123456789abcdef-" * 3 + "\n"
    output = "FIRST-LINE\n" + line * (200_000 // len(line)) + "LAST-LINE\n"
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    status, feedback = await contract.run(drv, vm, contract.job(output), max_output=cap)
    assert status == 0, feedback[:300]
    assert feedback.count(ELISION) == 1, feedback[:300]
    assert feedback.startswith(STATUS_0 + b"FIRST-LINE\n"), feedback[:300]
    assert feedback.endswith(b"\nLAST-LINE\n"), feedback[-300:]
    slack = len(ELISION) + 200  # the status line(s) and the marker
    assert cap - 100 <= len(feedback) <= cap + slack, len(feedback)


async def test_runjob_cancelled_leaves_nothing(contract: Contract) -> None:
    """runJob honours cancellation while the job runs (it returns within
    CANCEL_LIMIT, its work not shielded), and destroying the VM afterwards
    leaves nothing: getVMs is empty, so are the leftovers."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    with anyio.fail_after(CALL_LIMIT):
        await drv.copyIn(vm, contract.job(f"{MARKER}\n", seconds=30))
    ended = anyio.Event()
    returned: list[int] = []

    async def run() -> None:
        try:
            returned.append(await drv.runJob(vm, 60, 1_000_000, True))
        finally:
            ended.set()

    with anyio.fail_after(CALL_LIMIT + CANCEL_LIMIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await contract.wait_running(drv, vm)
            assert not ended.is_set(), f"a 30 s job's runJob ended at once: {returned}"
            cancelled_at = anyio.current_time()
            tg.cancel_scope.cancel()
        took = anyio.current_time() - cancelled_at
    assert took < CANCEL_LIMIT, f"runJob took {took:.1f} s to honour its cancellation"
    with anyio.fail_after(CALL_LIMIT):
        await drv.destroyVM(vm)
    assert await drv.getVMs() == []
    assert await contract.leftovers(drv) == []


async def test_getvms_sees_only_its_own(contract: Contract) -> None:
    """getVMs of a driver lists its owner's VMs, never another owner's on the
    same host."""
    a = await contract.driver(contract.owner("a"))
    b = await contract.driver(contract.owner("b"))
    va = await contract.ready_vm(a)
    vb = await contract.ready_vm(b)
    assert ids_of(await a.getVMs()) == [va.instance_id]
    assert ids_of(await b.getVMs()) == [vb.instance_id]


async def test_vm_names_never_collide_between_owners(contract: Contract) -> None:
    """Two owners may each have a VM of the same id and pool name (every
    manager counts its VM ids from 1): both are made, each owner's getVMs
    lists its own, and destroying one leaves the other's VM alone (it still
    runs a job)."""
    a = await contract.driver(contract.owner("a"))
    b = await contract.driver(contract.owner("b"))
    va = await contract.ready_vm(a, contract.vm(id=1))
    vb = await contract.ready_vm(b, contract.vm(id=1))
    assert [vm.id for vm in await a.getVMs()] == [1]
    assert [vm.id for vm in await b.getVMs()] == [1]
    with anyio.fail_after(CALL_LIMIT):
        await a.destroyVM(va)
    assert await a.getVMs() == []
    assert [vm.id for vm in await b.getVMs()] == [1]
    status, feedback = await contract.run(b, vb, contract.job("still here\n"))
    assert (status, feedback) == (0, STATUS_0 + b"still here\n")


async def test_instance_ids_are_unique_across_owners(contract: Contract) -> None:
    """``instance_id`` names one VM on the host, whoever's: two owners' VMs of
    the same id and pool name have different ones. getOrphans returns VMs of
    every owner, and a manager tells them from its own by instance_id
    (Manager._reconcile_driver skips an orphan whose instance_id one of its
    pools holds): a shared instance_id leaves that orphan in place."""
    a = await contract.driver(contract.owner("a"))
    b = await contract.driver(contract.owner("b"))
    va = await contract.ready_vm(a, contract.vm(id=1))
    vb = await contract.ready_vm(b, contract.vm(id=1))
    assert va.instance_id != vb.instance_id
    assert ids_of(await a.getVMs()) == [va.instance_id]
    assert ids_of(await b.getVMs()) == [vb.instance_id]


async def test_orphans_of_dead_owner(contract: Contract) -> None:
    """getOrphans never returns a live driver's VM (another owner's, or its
    own); once a driver is gone (closed, its VMs left: how a crashed manager
    looks in-process) its VMs are another owner's orphans, and destroyVM of
    such an orphan, through the other driver, leaves nothing of it."""
    a = await contract.driver(contract.owner("a"))
    b = await contract.driver(contract.owner("b"))
    va = await contract.ready_vm(a)
    vb = await contract.ready_vm(b)
    assert not {va.instance_id, vb.instance_id} & set(ids_of(await b.getOrphans()))
    assert not {va.instance_id, vb.instance_id} & set(ids_of(await a.getOrphans()))
    with anyio.fail_after(CALL_LIMIT):
        await a.close()  # A "dies": its VM stays
    orphans = [vm for vm in await b.getOrphans() if vm.instance_id == va.instance_id]
    assert len(orphans) == 1, f"{va.instance_id} not among {ids_of(await b.getOrphans())}"
    assert vb.instance_id not in ids_of(await b.getOrphans())
    with anyio.fail_after(CALL_LIMIT):
        await b.destroyVM(orphans[0])
    assert await contract.leftovers(a) == []
    assert ids_of(await b.getVMs()) == [vb.instance_id]
    fresh = await contract.driver(a.owner)
    assert await fresh.getVMs() == []


async def test_orphans_of_an_earlier_driver_of_the_same_owner(contract: Contract) -> None:
    """A restarted manager keeps its owner: the VMs the earlier (closed)
    driver of that owner left are listed by getVMs and are orphans of the new
    driver, whose own VMs are not; destroying them leaves only its own."""
    owner = contract.owner("a")
    old = await contract.driver(owner)
    left = await contract.ready_vm(old)
    with anyio.fail_after(CALL_LIMIT):
        await old.close()
    new = await contract.driver(owner)
    mine = await contract.ready_vm(new)
    assert ids_of(await new.getVMs()) == ids_of([left, mine])
    orphans = await new.getOrphans()
    assert left.instance_id in ids_of(orphans)
    assert mine.instance_id not in ids_of(orphans)
    with anyio.fail_after(CALL_LIMIT):
        for vm in orphans:
            if vm.instance_id == left.instance_id:
                await new.destroyVM(vm)
    assert ids_of(await new.getVMs()) == [mine.instance_id]


async def test_job_on_destroyed_vm_raises_vmms_error(contract: Contract) -> None:
    """A job on a VM that was destroyed fails with a typed VMMSError (at copyIn
    or at runJob), never runs, and never fails with an untyped exception."""
    drv = await contract.driver()
    vm = await contract.ready_vm(drv)
    with anyio.fail_after(CALL_LIMIT):
        await drv.destroyVM(vm)
    files = contract.job("must not run\n")
    with anyio.fail_after(CALL_LIMIT), pytest.raises(VMMSError):
        await drv.copyIn(vm, files)
        await drv.runJob(vm, 20, 1_000_000, True)
    assert await drv.getVMs() == []
    assert await contract.leftovers(drv) == []


async def test_close_leaves_nothing(contract: Contract) -> None:
    """A manager leaving its ``async with`` (pool of 2, one job done, one
    running) cancels the running job, destroys every VM and closes the
    driver: a fresh driver of the same owner lists no VM and nothing is left.
    close() again does not raise."""
    drv = await contract.driver()
    async with Manager(contract.settings(pool_size=2), drivers={contract.target.name: drv},
                       owner=drv.owner) as mgr:
        pool = await mgr.ensure_pool(contract.target.image)
        with anyio.fail_after(CREATE_LIMIT):
            await pool.wait_until(lambda s: s.free >= 2)
        quick = await mgr.submit(make_job(contract.target.image, contract.job("quick\n"),
                                          str(contract.out("quick")), name="quick",
                                          timeout=20))
        assert (await finish(quick, CREATE_LIMIT)).outcome is Outcome.SUCCESS
        n = len(drv.called("runJob")) + 1  # the busy job's runJob: the next one
        busy = await mgr.submit(make_job(
            contract.target.image, contract.job(f"{MARKER}\n", seconds=30),
            str(contract.out("busy")), name="busy", timeout=60))
        with anyio.fail_after(CALL_LIMIT):
            vm = await drv.wait_call("runJob", n)
        assert vm is not None
        await contract.wait_running(drv, vm, n)
        assert not busy.done()
        leaving = anyio.current_time()
    assert anyio.current_time() - leaving < CALL_LIMIT
    assert busy.result is not None and busy.result.outcome is Outcome.CANCELLED
    with anyio.fail_after(CALL_LIMIT):
        await drv.close()
    fresh = await contract.driver(drv.owner)
    assert await fresh.getVMs() == []
    assert await contract.leftovers(drv) == []


async def test_get_images(contract: Contract) -> None:
    """getImages() exists and returns None (unknown) or a list holding the
    target's image. If a list: initializeVM of an image not in it raises
    InitializeVMError, destroying that VM leaves nothing, and a manager
    refuses a job for it at submit (UnknownImageError)."""
    drv = await contract.driver()
    with anyio.fail_after(CALL_LIMIT):
        images = await drv.getImages()
    assert images is None or isinstance(images, list), images
    if images is None:
        return
    assert contract.target.image in images, images
    bogus = "vmpool-contract-no-such-image"
    assert bogus not in images
    vm = contract.vm(bogus)
    with anyio.fail_after(CREATE_LIMIT), pytest.raises(InitializeVMError):
        await drv.initializeVM(vm)
    with anyio.fail_after(CALL_LIMIT):
        await drv.destroyVM(vm)
    assert await drv.getVMs() == []
    assert await contract.leftovers(drv) == []
    async with Manager(contract.settings(pool_size=0), drivers={contract.target.name: drv},
                       owner=drv.owner) as mgr:
        with pytest.raises(UnknownImageError):
            await mgr.submit(make_job(bogus, contract.job("never\n"),
                                      str(contract.out("bogus")), name="bogus"))
    assert drv.called("initializeVM") == ["initializeVM"]  # only the one above


__all__ = ["Contract", "Recording", "Target", "contract", "uniform_job",
           *sorted(name for name in dir() if name.startswith("test_"))]
