"""The adversarial set, end to end through the Docker driver and a REAL engine.

Manager -> pool -> scheduler -> DockerVMMS -> aiodocker -> dockerd ->
container (network "none") -> vmpool's autodriver -> make, with the grading
image ``vmpool/grader`` (the session fixture ``docker_host`` starts the
engine and builds the image when needed).

Every test gets its own owner label, and afterwards no container of it may
be left (checked, and cleaned up, by the ``dock`` fixture). Nothing waits by
sleeping: the tests wait on job results, pool states and driver events, each
bounded by ``anyio.fail_after``. Two things have no event and are sampled
while a job runs: the engine's latency during the fork bomb (as the local
driver's tests do) and "the job's process has started in its container"
(/proc on this host; the job has no network to say so, and its output only
comes at its end). The container's pids.peak is read from this host's
cgroup v1 pids controller (the engine runs here, cgroupfs driver).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import socket
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import anyio.abc
import pytest
from aiodocker.exceptions import DockerError

from vmpool import (
    InputFile,
    JobError,
    JobHandle,
    Manager,
    Outcome,
    Settings,
    TangoJob,
    TangoMachine,
    UnknownImageError,
    make_job,
)
from vmpool_drivers.docker import DockerVMMS

from .conftest import ROOT, autograder_re
from .jobs import (
    CGROUP_BOMB_PY,
    ELISION,
    FORK_BOMB_PY,
    MEMORY_BOMB_PY,
    driver_test_settings,
    finish,
    read_lines,
    warm,
)

IMAGE = "vmpool/grader"
MIB = 1024 * 1024
LABEL_OWNER = "vmpool.owner"
_slots = itertools.count()


# --------------------------------------------------------------------------
# Helpers


class Probe(DockerVMMS):
    """The Docker driver, noting what the tests need to see (nothing else changes).

    ``runjob_started``: when each runJob began (by VM id), ``runjob_seen`` is
    set at the first one; ``pids_peak``: the container's pids.peak (host
    cgroup) read just before it is removed; ``hold`` makes every later
    creation stop after the container is made (until cancelled).
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.runjob_started: dict[int, float] = {}
        self.runjob_seen = anyio.Event()
        self.pids_peak: dict[str, int] = {}
        self.hold = False
        self.creation_started = anyio.Event()
        self.created = anyio.Event()

    async def initializeVM(self, vm: TangoMachine) -> None:
        if not self.hold:
            return await super().initializeVM(vm)
        self.creation_started.set()
        await super().initializeVM(vm)
        self.created.set()
        await anyio.sleep_forever()  # held: only a cancel (the pool closing) ends it

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        self.runjob_started[vm.id or 0] = time.monotonic()
        self.runjob_seen.set()
        return await super().runJob(vm, runTimeout, maxOutputFileSize, disableNetwork)

    async def destroyVM(self, vm: TangoMachine) -> None:
        cid = vm.driver_data.get("cid")
        if cid:
            with contextlib.suppress(OSError, ValueError):
                peak = Path(f"/sys/fs/cgroup/pids/docker/{cid}/pids.peak").read_text()
                self.pids_peak[cid] = int(peak)
        await super().destroyVM(vm)


class LateAutodriver(Probe):
    """Gives the autodriver a much longer timeout than the scheduler's: only
    the outer deadline (timeout + runjob_grace) can stop the job."""

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        return await super().runJob(vm, 60, maxOutputFileSize, disableNetwork)




def check_output(h: JobHandle, closing: str, autodriver: list[str], *extra: str) -> list[str]:
    """Assert Tango's lines (header, closing line, ``extra`` lines, "Here is the
    output", ``---``), then that the autodriver's output starts with
    ``autodriver``; returns the autodriver's lines."""
    out = read_lines(h)
    n = 2 + len(extra)
    assert len(out) >= n + 2, out
    assert re.fullmatch(autograder_re(f"Received job {h.job.name}:{h.id}"), out[0]), out
    assert re.fullmatch(autograder_re(closing), out[1]), out
    for i, line in enumerate(extra, 2):
        assert re.fullmatch(autograder_re(line), out[i]), out
    assert re.fullmatch(autograder_re("Here is the output from the autograder:"), out[n]), out
    assert out[n + 1] == "---", out
    assert out[n + 2 : n + 2 + len(autodriver)] == autodriver, out
    return out[n + 2 :]






def processes_in(cid: str) -> list[str]:
    """Live processes of container ``cid`` as the host sees them: "pid uid name"."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if cid not in Path(f"/proc/{name}/cgroup").read_text():
                continue
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "?").strip()[:1] in ("Z", "X"):
            continue
        uid = fields.get("Uid", "").split()[:1]
        found.append(f"{name} {uid[0] if uid else '?'} {fields.get('Name', '').strip()}")
    return found


async def wait_for_process(cid: str, name: str, limit: float = 15) -> None:
    """Wait until a process called ``name`` runs in container ``cid``."""
    with anyio.fail_after(limit):
        # No event says "a process started in a container" (the job has no
        # network to tell us, and its output comes at its end): look in /proc.
        while not any(p.split()[2:] == [name] for p in processes_in(cid)):  # noqa: ASYNC110
            await anyio.sleep(0.02)


class EngineLeftovers:
    """What a test's owners left on the engine, and its removal (for a class
    with ``host``, ``owners`` and ``containers(owner)``)."""

    host: str
    owners: list[str]

    async def containers(self, owner: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def leftovers(self) -> dict[str, list[str]]:
        left = {}
        for owner in self.owners:
            found = await self.containers(owner)
            if found:
                left[owner] = [f"{c['Id'][:12]} {c.get('State')}" for c in found]
        return left

    async def clean(self) -> None:
        """Remove whatever a failed test left, so that it does not leak."""
        async with aiodocker.Docker(url=self.host) as docker:
            for owner in self.owners:
                for c in await docker.containers.list(
                    all=True, filters={"label": [f"{LABEL_OWNER}={owner}"]}
                ):
                    with contextlib.suppress(DockerError):
                        await c.delete(force=True, v=True)


class Dock(EngineLeftovers):
    """One test's engine, owner label and job factory."""

    def __init__(self, host: str, tmp: Path, slot: int) -> None:
        self.host = host
        self.tmp = tmp
        self.owner = f"tdd{slot}-{os.getpid()}"
        #: every owner the test makes containers for (checked after the test)
        self.owners = [self.owner]
        (tmp / "out").mkdir()

    def driver(self, cls: type[Probe] = Probe, **kw: Any) -> Probe:
        kw.setdefault("owner", self.owner)
        return cls(url=self.host, **kw)

    def settings(self, **kw: Any) -> Settings:
        return driver_test_settings("docker", **kw)

    def job(
        self,
        name: str,
        recipe: list[str] | None = None,
        files: dict[str, str] | None = None,
        *,
        image: str = IMAGE,
        copy: list[Path] | None = None,
        **kw: Any,
    ) -> TangoJob:
        """A job whose Makefile runs ``recipe`` (or the ``copy`` files, Makefile first)."""
        d = self.tmp / "jobs" / name
        d.mkdir(parents=True)
        inputs: list[tuple[str, str]] = [(str(p), p.name) for p in copy or []]
        if recipe is not None:
            (d / "Makefile").write_text("all:\n" + "".join(f"\t{line}\n" for line in recipe))
            inputs.insert(0, (str(d / "Makefile"), "Makefile"))
        for fname, text in (files or {}).items():
            (d / fname).write_text(text)
            inputs.append((str(d / fname), fname))
        return make_job(image, inputs, str(self.tmp / "out" / f"{name}.out"), name=name, **kw)

    async def containers(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Every container (running or not) with the owner label: Id, State, Labels."""
        async with aiodocker.Docker(url=self.host) as docker:
            found = await docker.containers.list(
                all=True, filters={"label": [f"{LABEL_OWNER}={owner or self.owner}"]}
            )
            return [c._container for c in found]

    async def container_ids(self, owner: str | None = None) -> set[str]:
        return {c["Id"] for c in await self.containers(owner)}

    async def inspect(self, cid: str) -> dict[str, Any] | None:
        """The engine's view of container ``cid``; None once it is removed."""
        async with aiodocker.Docker(url=self.host) as docker:
            try:
                return dict((await docker.containers.get(cid))._container)
            except DockerError as e:
                if e.status == 404:
                    return None
                raise

    async def exec_in(self, cid: str, cmd: list[str]) -> str:
        async with aiodocker.Docker(url=self.host) as docker:
            exe = await docker.containers.container(cid).exec(cmd, stdout=True, stderr=True)
            async with exe.start(detach=False) as stream:
                out = b""
                while (msg := await stream.read_out()) is not None:
                    out += msg.data
            return out.decode()


@pytest.fixture
async def dock(docker_host: str, tmp_path: Path) -> AsyncIterator[Dock]:
    env = Dock(docker_host, tmp_path, next(_slots))
    yield env
    left = await env.leftovers()
    if left:
        await env.clean()
    assert left == {}, f"containers left behind: {left}"


# --------------------------------------------------------------------------
# 1. a job through a warm pool


async def test_jobs_through_a_warm_pool_give_tangos_output(dock: Dock) -> None:
    drv = dock.driver()
    examples = ROOT / "examples"
    latencies = []
    async with Manager(dock.settings(pool_size=2), drivers={"docker": drv}) as mgr:
        handles = []
        for job in (
            dock.job("c-program", copy=[examples / "c-program" / f for f in ("Makefile", "sum.c")],
                     timeout=20),
            dock.job("hello", copy=[examples / "hello" / "Makefile"], timeout=10),
            dock.job(
                "identity",
                ["@id -u", "@id -un", "@pwd", "@grep -E '^(CapEff|NoNewPrivs)' /proc/self/status",
                 "@exit 3"],
                timeout=10,
            ),
        ):
            await warm(mgr, IMAGE, 2)
            h = await mgr.submit(job)
            r = await finish(h)
            latencies.append(r.finished_at - r.submitted_at)
            handles.append(h)
    print("warm-pool job latency (submit to output file): "
          + ", ".join(f"{t * 1000:.0f} ms" for t in latencies))
    c_prog, hello, identity = handles
    for h in handles:
        assert h.result is not None
        assert h.result.outcome is Outcome.SUCCESS and h.result.retries == 0, h.result
        assert h.result.steps == {"waitvm": 0, "copyin": 0, "runjob": 0, "copyout": 0}
    assert c_prog.result is not None and c_prog.result.exit_status == 0
    assert check_output(c_prog, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 0",
        "tests passed: 100/100",
        '{"scores": {"sum": 100}}',
    ]
    assert check_output(hello, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 0",
        "Hello from a vmpool job",
        '{"scores": {"hello": 100}}',
    ]
    # a failing make is the job's result: the autodriver returned normally
    assert identity.result is not None and identity.result.exit_status == 0
    assert identity.vm is not None
    uid = identity.vm.driver_data["uid"]  # the container's own (tests/test_docker_sandbox.py)
    assert check_output(identity, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 2",
        str(uid),
        "autograde",
        "/home/autograde/autolab",
        "CapEff:\t0000000000000000",
        "NoNewPrivs:\t1",
        "make: *** [Makefile:6: all] Error 3",
    ]
    # each job had its own container; the output file only, nothing beside it
    assert len({h.vm.instance_id for h in handles if h.vm is not None}) == 3
    assert sorted(p.name for p in (dock.tmp / "out").iterdir()) == [
        "c-program.out", "hello.out", "identity.out"
    ]
    assert max(latencies) < 5


# --------------------------------------------------------------------------
# 2. fork bomb



@pytest.mark.parametrize(
    ("nproc", "pids_limit"), [(100, 512), (1000, 60)], ids=["nproc-binds", "pids-limit-binds"]
)
async def test_fork_bomb_is_contained(dock: Dock, nproc: int, pids_limit: int) -> None:
    drv = dock.driver(nproc=nproc, pids_limit=pids_limit)
    async with Manager(dock.settings(pool_size=2), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE, 2)
        pool = await mgr.ensure_pool(IMAGE)
        before = await dock.container_ids()
        job = dock.job("bomb", ["@python3 bomb.py"], {"bomb.py": FORK_BOMB_PY}, timeout=2)
        start = time.monotonic()
        h = await mgr.submit(job)
        latencies = []
        async with aiodocker.Docker(url=dock.host) as docker:
            while not h.done():
                t = time.monotonic()
                await docker.version()  # does the engine still answer?
                latencies.append(time.monotonic() - t)
                with anyio.move_on_after(0.1):  # measure every 0.1 s until the job ends
                    await h.wait()
        r = await finish(h)
        elapsed = time.monotonic() - start
        assert h.vm is not None and h.vm.instance_id is not None
        cid = h.vm.instance_id
        with anyio.fail_after(30):  # back to the target: 2 warm, nothing else
            st = await pool.wait_until(
                lambda s: s.free == 2 and s.total == 2 and s.destroying == 0
            )
        after = await dock.container_ids()
        inventory = {vm.instance_id for vm in mgr.inventory()}
    print(
        f"fork bomb: {elapsed:.2f}s, pids.peak {drv.pids_peak.get(cid)}, "
        f"worst engine latency {max(latencies) * 1000:.0f} ms"
    )
    assert r.outcome is Outcome.TIMEOUT and r.exit_status == 2 and r.retries == 0
    assert check_output(h, "Error: Job timed out after 2 seconds", []) == [
        "Autodriver: Job timed out after 2 seconds",
        "bombing",
    ]
    assert elapsed < 2 + 3
    assert cid in before and cid not in after
    assert len(after) == st.total == 2 and after == inventory
    # the bomb reached the binding limit and no further: RLIMIT_NPROC (the
    # grading uid's processes, + the container's own 4: init, tail, sh,
    # autodriver) or the container's PidsLimit
    peak = drv.pids_peak[cid]
    assert peak <= min(nproc + 4 + 1, pids_limit), peak
    assert peak >= min(nproc, pids_limit) - 5, peak
    assert max(latencies) < 2


# --------------------------------------------------------------------------
# 3. memory bombs


# Four processes of 40 MB each: every one fits the per-process limit
# (RLIMIT_AS 64 MiB), together they exceed the container's 64 MiB, so the
# container's OOM killer (which the autodriver cannot see) kills one.

# Forty processes of 3 MiB: each far smaller than the autodriver (a Python
# process of ~15 MB), so the container's OOM killer would pick the autodriver
# (and the job's output would be lost) but for oom_score_adj: the job's
# processes are +1000 (the autodriver's own is -1000 where the engine allows
# it), so they are the ones killed, the autodriver survives and says so.
SMALL_HOGS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
int main(void) {
    printf("forking\n");
    fflush(stdout);
    for (int i = 0; i < 40; i++) {
        if (fork() == 0) {
            size_t n = 3 << 20;
            volatile char *p = malloc(n);
            for (size_t j = 0; p && j < n; j += 4096)
                p[j] = 1;
            sleep(3);  /* ok-sleep: holding the memory while the others allocate */
            _exit(0);
        }
    }
    int status, killed = 0;
    while (wait(&status) > 0)
        killed += WIFSIGNALED(status) && WTERMSIG(status) == 9;
    printf("children killed by signal 9: %s\n", killed ? "some" : "none");
    return 0;
}
"""

MEM_LINE = f"Autodriver: memory limit of {64 * MIB} bytes exceeded"


@pytest.mark.parametrize(
    ("recipe", "files", "status", "says"),
    [
        (["@python3 bomb.py"], {"bomb.py": MEMORY_BOMB_PY}, 2, "MemoryError"),
        (["@python3 bomb.py"], {"bomb.py": CGROUP_BOMB_PY}, 2, "a child was killed by signal 9"),
        (["@gcc -O2 -o hogs hogs.c", "@./hogs"], {"hogs.c": SMALL_HOGS_C}, 0,
         "children killed by signal 9: some"),
    ],
    ids=[
        "one-process-rlimit",
        "container-oom-kills-a-job-process",
        "container-oom-spares-the-autodriver",
    ],
)
async def test_memory_bomb_is_killed_and_reported(
    dock: Dock, recipe: list[str], files: dict[str, str], status: int, says: str
) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE, memory=64)
        (vm,) = mgr.inventory()
        info = await dock.inspect(vm.instance_id or "")
        assert info is not None
        host_config = info["HostConfig"]
        assert host_config["Memory"] == host_config["MemorySwap"] == 64 * MIB
        h = await mgr.submit(dock.job("mem", recipe, files, timeout=20, memory=64))
        r = await finish(h)
    assert r.retries == 0 and r.failures == []
    assert h.vm is not None and h.vm.memory == 64 and h.vm.instance_id == vm.instance_id
    assert r.finished_at - r.submitted_at < 15
    # the autodriver survived and says so (for the container's OOM kill, the
    # driver added the line: the autodriver cannot see that cgroup), with
    # the job's output
    assert r.outcome is Outcome.SUCCESS and r.exit_status == 0
    out = check_output(
        h,
        "Success: Autodriver returned normally",
        [f"Autodriver: Job exited with status {status}", MEM_LINE],
    )
    assert says in out, out
    assert out.count(MEM_LINE) == 1


# --------------------------------------------------------------------------
# 4. no network

NET_PY = """\
import os, socket, sys
for what, host in (("loopback", "127.0.0.1"), ("host", sys.argv[2]), ("internet", "1.1.1.1")):
    try:
        socket.create_connection((host, int(sys.argv[1])), timeout=3).close()
        print(what + ": connected", flush=True)
    except OSError as e:
        print(what + ":", e.strerror or e, flush=True)
try:
    socket.getaddrinfo("example.com", 80)
    print("dns: resolved")
except OSError as e:
    print("dns:", e.strerror or e)
print("interfaces:", " ".join(sorted(os.listdir("/sys/class/net"))))
"""


def host_address() -> str:
    """This host's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.200", 9))
        addr: str = s.getsockname()[0]
    assert not addr.startswith("127."), addr
    return addr


async def test_network_is_unreachable(dock: Dock) -> None:
    drv = dock.driver()
    connections: list[str] = []
    both_seen = anyio.Event()

    async def handle(stream: anyio.abc.SocketStream) -> None:
        connections.append(str(stream.extra(anyio.abc.SocketAttribute.remote_address)))
        if len(connections) == 2:
            both_seen.set()
        await stream.aclose()

    addr = host_address()
    listener = await anyio.create_tcp_listener(local_host="0.0.0.0", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        # the listener answers on both addresses, from this host
        for target in ("127.0.0.1", addr):
            with anyio.fail_after(5):
                await (await anyio.connect_tcp(target, port)).aclose()
        with anyio.fail_after(5):
            await both_seen.wait()  # the handler runs in its own task
        async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
            await warm(mgr, IMAGE)
            (vm,) = mgr.inventory()
            info = await dock.inspect(vm.instance_id or "")
            job = dock.job(
                "net", [f"@python3 net.py {port} {addr}"], {"net.py": NET_PY}, timeout=20
            )
            h = await mgr.submit(job)
            r = await finish(h)
            assert h.vm is not None and h.vm.instance_id == vm.instance_id
        tg.cancel_scope.cancel()
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    assert check_output(h, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 0",
        "loopback: Connection refused",  # the container's own loopback: nothing listens
        "host: Network is unreachable",
        "internet: Network is unreachable",
        "dns: Temporary failure in name resolution",
        "interfaces: lo",
    ]
    assert len(connections) == 2  # the test's own two: none from the job
    assert info is not None and info["HostConfig"]["NetworkMode"] == "none"


# --------------------------------------------------------------------------
# 5. timeouts: the autodriver's, and the outer deadline


async def test_infinite_loop_is_killed_at_the_deadline(dock: Dock) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        h = await mgr.submit(
            dock.job("loop", copy=[ROOT / "examples" / "timeout" / "Makefile"], timeout=1)
        )
        r = await finish(h)
        assert h.vm is not None and h.vm.id is not None
        took = r.finished_at - drv.runjob_started[h.vm.id]
    assert r.outcome is Outcome.TIMEOUT and r.exit_status == 2 and r.retries == 0
    assert check_output(h, "Error: Job timed out after 1 seconds", []) == [
        "Autodriver: Job timed out after 1 seconds",
        "starting an endless loop",
    ]
    assert 1 <= took < 1 + 1.5, took


async def test_outer_deadline_stops_a_job_the_autodriver_does_not(dock: Dock) -> None:
    drv = dock.driver(LateAutodriver)
    settings = dock.settings(runjob_grace=1.0)
    async with Manager(settings, drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        pool = await mgr.ensure_pool(IMAGE)
        h = await mgr.submit(
            dock.job("late", ["@echo started", "@while :; do :; done"], timeout=1)
        )
        r = await finish(h)
        assert h.vm is not None and h.vm.id is not None and h.vm.instance_id is not None
        cid, vm_id = h.vm.instance_id, h.vm.id
        took = r.finished_at - drv.runjob_started[vm_id]
        # killed at once, in runJob's cleanup (the removal follows in the background)
        at_end = await dock.inspect(cid)
        with anyio.fail_after(30):
            await pool.wait_until(lambda s: s.free == 1 and s.destroying == 0)
        gone = await dock.inspect(cid)
    assert r.outcome is Outcome.TIMEOUT and r.exit_status is None and r.retries == 0
    assert r.steps["runjob"] == -1 and r.steps["copyout"] is None
    assert check_output(
        h,
        "Error: Job timed out after 1 seconds",
        [],
        f"runJob did not return within 2 s; the job was stopped and VM local-{vm_id}-{IMAGE} "
        "destroyed",
    ) == []
    assert 2 - 0.05 <= took < 2 + 1.5, took
    assert at_end is None or not at_end["State"]["Running"], at_end
    assert gone is None
    assert processes_in(cid) == []


# --------------------------------------------------------------------------
# 6. output flood


async def test_output_flood_is_capped(dock: Dock) -> None:
    cap = 100_000
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        job = dock.job(
            "flood",
            ["@head -c 1000000000 /dev/zero | tr '\\0' a", "@echo", "@echo LAST-LINE"],
            timeout=60,
            max_output=cap,
        )
        h = await mgr.submit(job)
        r = await finish(h, 90)
    print(f"flood: 1 GB through the autodriver in {r.finished_at - r.submitted_at:.2f}s")
    assert r.outcome is Outcome.SUCCESS and r.exit_status == 0 and r.retries == 0
    check_output(
        h, "Success: Autodriver returned normally", ["Autodriver: Job exited with status 0"]
    )
    data = Path(h.job.outputFile).read_bytes()
    body = data[data.index(b"---\n") + 4 :]
    tail = b"a" * (cap // 2 - len(b"\nLAST-LINE\n")) + b"\nLAST-LINE\n"
    assert body == b"Autodriver: Job exited with status 0\n" + b"a" * (cap // 2) + ELISION + tail
    assert len(data) <= cap + len(ELISION) + 400


async def test_a_64_mib_feedback_and_input_never_sit_in_the_drivers_memory(dock: Dock) -> None:
    """The input tar and the feedback go through spool files a chunk at a
    time: Python's allocations during copyIn + runJob + copyOut stay far
    below the 32 MiB input and the (almost) 64 MiB feedback."""
    import tracemalloc

    big = dock.tmp / "big.bin"
    with open(big, "wb") as f:
        f.truncate(32 * MIB)  # sparse: costs the test nothing
    makefile = dock.tmp / "Makefile"
    makefile.write_text("all:\n\t@wc -c < big.bin\n\t@head -c 67000000 /dev/zero | tr '\\0' a\n")
    cap = 64 * MIB + 4096
    drv = dock.driver()
    vm = TangoMachine(name=IMAGE, image=IMAGE, id=1)
    out = dock.tmp / "out" / "feedback"
    try:
        await drv.initializeVM(vm)
        await drv.waitVM(vm, 20)
        tracemalloc.start()
        try:
            await drv.copyIn(vm, [InputFile(str(makefile), "Makefile"),
                                  InputFile(str(big), "big.bin")])
            assert isinstance(vm.driver_data["input_tar"], str)  # a path, not the bytes
            code = await drv.runJob(vm, 60, cap, True)
            assert vm.feedback is not None and vm.feedback.spooled  # a file, not the bytes
            spooled = vm.feedback.path
            assert spooled is not None and spooled.stat().st_size > 63 * MIB
            await drv.copyOut(vm, str(out))
            _, peak = tracemalloc.get_traced_memory()
            spool_dir = Path(spooled).parent
        finally:
            tracemalloc.stop()
        print(f"64 MiB feedback: peak Python allocations {peak / MIB:.2f} MiB")
        assert code == 0
        assert peak < 8 * MIB, f"peak Python allocations {peak / MIB:.1f} MiB"
        assert not Path(spooled).exists()  # copied out and removed
        with open(out, "rb") as f:
            head = f.read(100)
            f.seek(-10, os.SEEK_END)
            tail = f.read()
        assert head.startswith(b"Autodriver: Job exited with status 0\n33554432\naaaa"), head
        assert tail == b"a" * 10
        status = b"Autodriver: Job exited with status 0\n33554432\n"
        assert out.stat().st_size == len(status) + 67_000_000  # (the cap is 64 MiB)
    finally:
        await drv.destroyVM(vm)
        await drv.close()
    assert not spool_dir.exists()  # the driver's spool directory goes with it


# --------------------------------------------------------------------------
# 7. crash recovery


async def test_containers_of_a_crashed_manager_are_removed_on_startup(dock: Dock) -> None:
    crashed = dock.driver()
    other_owner = f"{dock.owner}-other"
    dock.owners.append(other_owner)
    other = dock.driver(owner=other_owner)
    old, theirs = [], TangoMachine(name=IMAGE, image=IMAGE, id=1)
    try:
        for i in (1, 2):
            vm = TangoMachine(name=IMAGE, image=IMAGE, id=i)
            await crashed.initializeVM(vm)
            await crashed.waitVM(vm, 20)
            old.append(vm)
        await other.initializeVM(theirs)
        assert await dock.container_ids() == {vm.instance_id for vm in old}
        assert sorted(vm.id or 0 for vm in await crashed.getVMs()) == [1, 2]
        await crashed.close()  # the crash: the driver is gone, its containers stay

        drv = dock.driver()
        async with Manager(dock.settings(pool_size=2), drivers={"docker": drv}) as mgr:
            # reconciled on startup: before any pool of this run exists
            assert mgr.pools == {}
            assert await dock.container_ids() == set()
            await warm(mgr, IMAGE, 2)
            found = await drv.getVMs()
            assert {vm.instance_id for vm in found} == {
                vm.instance_id for vm in mgr.inventory()
            } == await dock.container_ids()
            assert sorted(vm.id or 0 for vm in found) == [3, 4]  # above the old ids
            # another owner's container was left alone, still running
            info = await dock.inspect(theirs.instance_id or "")
            assert info is not None and info["State"]["Running"], info
            assert await dock.container_ids(other_owner) == {theirs.instance_id}
    finally:
        await other.destroyVM(theirs)
        await other.close()
        await crashed.close()
    assert await dock.container_ids(other_owner) == set()


# --------------------------------------------------------------------------
# 8. one-shot VMs: refill after each job


async def test_pool_refills_with_new_containers_after_each_job(dock: Dock) -> None:
    drv = dock.driver()
    latencies = []
    async with Manager(dock.settings(pool_size=2), drivers={"docker": drv}) as mgr:
        pool = await mgr.ensure_pool(IMAGE)
        seen: set[str] = set()
        used: list[str] = []
        for i in range(4):
            with anyio.fail_after(30):
                st = await pool.wait_until(
                    lambda s: s.free == 2 and s.total == 2 and s.destroying == 0
                )
            warm_ids = await dock.container_ids()
            assert len(warm_ids) == 2 and warm_ids == {vm.instance_id for vm in mgr.inventory()}
            assert not warm_ids & set(used)  # a used container never comes back
            seen |= warm_ids
            h = await mgr.submit(dock.job(f"job{i}", ["@echo job" + str(i)], timeout=10))
            r = await finish(h)
            latencies.append(r.finished_at - r.submitted_at)
            assert r.outcome is Outcome.SUCCESS and r.retries == 0
            assert check_output(h, "Success: Autodriver returned normally", []) == [
                "Autodriver: Job exited with status 0",
                f"job{i}",
            ]
            assert h.vm is not None and h.vm.instance_id in warm_ids
            used.append(h.vm.instance_id)
        with anyio.fail_after(30):
            st = await pool.wait_until(
                lambda s: s.free == 2 and s.total == 2 and s.destroying == 0
            )
        final = await dock.container_ids()
    latencies.sort()
    print(
        "one-shot warm-pool jobs: "
        + ", ".join(f"{t * 1000:.0f} ms" for t in latencies)
        + f" (median {latencies[len(latencies) // 2] * 1000:.0f} ms)"
    )
    assert len(set(used)) == 4 and not final & set(used)
    assert len(final) == st.total == 2
    assert len(seen | final) == 2 + 4  # each job's container replaced by a new one


# --------------------------------------------------------------------------
# 9. closing the manager


async def test_close_leaves_no_container(dock: Dock) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(pool_size=2), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE, 2)
        pool = await mgr.ensure_pool(IMAGE)
        made = set(await dock.container_ids())
        drv.hold = True  # every creation from now on is in flight until the close
        done = await mgr.submit(dock.job("quick", ["@echo quick"], timeout=10))
        assert (await finish(done)).outcome is Outcome.SUCCESS
        drv.runjob_seen = anyio.Event()
        busy = await mgr.submit(dock.job("busy", ["@echo busy", "@sleep 1000"], timeout=60))
        with anyio.fail_after(20):
            await drv.runjob_seen.wait()
        assert busy.vm is not None and busy.vm.instance_id is not None
        cid = busy.vm.instance_id
        await wait_for_process(cid, "sleep")  # the job runs when the manager exits
        with anyio.fail_after(20):
            await drv.created.wait()  # a container made, its creation not ended
        made |= await dock.container_ids()
        # and creations whose create request is on its way to the engine
        drv.creation_started = anyio.Event()
        pool.resize(4)
        with anyio.fail_after(20):
            await drv.creation_started.wait()
        assert pool.status().creating >= 2
    assert busy.result is not None and busy.result.outcome is Outcome.CANCELLED
    assert check_output(busy, "Error: Job cancelled (vmpool is shutting down)", []) == []
    assert await dock.container_ids() == set()
    assert cid in made and all(processes_in(c) == [] for c in made)
    assert drv._docker is None  # the driver's client is closed


# --------------------------------------------------------------------------
# 10. a destFile escaping the job directory


async def test_dest_file_with_dotdot_is_refused(dock: Dock) -> None:
    drv = dock.driver()
    assert not Path("/etc/x").exists()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        warm_ids = await dock.container_ids()
        job = dock.job("escape", ["@echo hello"])
        job.input.append(InputFile(job.input[0].localFile, "../../etc/x"))
        with pytest.raises(JobError, match=re.escape("destFile '../../etc/x' contains '..'")):
            await mgr.submit(job)
        assert mgr.scheduler.counters.job_requests == 0
        assert await dock.container_ids() == warm_ids  # no container made or used for it
        assert mgr.status()[IMAGE].free == 1
        # every unsafe form is refused at submit (the drivers' copyIn relies
        # on it), each one named
        for i, dest in enumerate(("../etc/passwd", "/etc/x", "a/../../x")):
            bad = dock.job(f"escape-{i}", ["@echo hello"])
            bad.input.append(InputFile(bad.input[0].localFile, dest))
            with pytest.raises(JobError, match=re.escape(f"destFile {dest!r}")):
                await mgr.submit(bad)
        assert mgr.scheduler.counters.job_requests == 0
        assert await dock.container_ids() == warm_ids
    assert not Path("/etc/x").exists()


# --------------------------------------------------------------------------
# 11. unknown image


async def test_unknown_image_is_refused_at_submit(dock: Dock) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        assert IMAGE in await drv.getImages()
        job = dock.job("nope", ["@echo hello"], image="nope/nope")
        start = time.monotonic()
        with pytest.raises(UnknownImageError, match=re.escape("unknown image 'nope/nope'")):
            await mgr.submit(job)
        assert time.monotonic() - start < 1
        assert mgr.pools == {} and mgr.scheduler.counters.job_requests == 0
        assert await dock.container_ids() == set()
    assert not Path(job.outputFile).exists()


# --------------------------------------------------------------------------
# 12. the image's own autodriver (Tango's images have /usr/bin/autodriver)

IMAGE_AUTODRIVER = """\
#!/bin/sh
# what a Tango grading image has: an autodriver of its own
# (vmpool's autodriver gives the job a fresh environment: the two variables
# that show which autodriver ran are passed explicitly)
exec python3 /usr/lib/tango/autodriver.py --env "AUTODRIVER=image's own" \
    --env "AUTODRIVER_ARGS=$*" "$@"
"""


@pytest.fixture
async def tango_image(dock: Dock) -> AsyncIterator[str]:
    """A grading image with its own /usr/bin/autodriver, committed from a
    container of vmpool/grader (no build context, no registry)."""
    tag = f"t{os.getpid()}-{dock.owner}"
    repo = "vmpool/grader-tango"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, data, mode in (
            ("usr/bin/autodriver", IMAGE_AUTODRIVER.encode(), 0o755),
            ("usr/lib/tango/autodriver.py", (ROOT / "autodriver" / "autodriver.py").read_bytes(),
             0o644),
        ):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    start = time.monotonic()
    async with aiodocker.Docker(url=dock.host) as docker:
        base = await docker.containers.create(
            {"Image": IMAGE, "Cmd": ["tail", "-f", "/dev/null"]}, name=f"{dock.owner}-base"
        )
        try:
            await base.put_archive("/", buf.getvalue())
            await base.commit(repository=repo, tag=tag)
        finally:
            await base.delete(force=True)
        print(f"committed {repo}:{tag} in {time.monotonic() - start:.2f}s")
        try:
            yield f"{repo}:{tag}"
        finally:
            await docker.images.delete(f"{repo}:{tag}", force=True)


async def test_the_images_own_autodriver(dock: Dock, tango_image: str) -> None:
    drv = dock.driver(image_autodriver="/usr/bin/autodriver")
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        assert tango_image in await drv.getImages()
        job = dock.job(
            "tango",
            [
                "@echo autodriver=$$AUTODRIVER",
                "@echo args=$$AUTODRIVER_ARGS",
                "@id -un",
                "-@ls /opt/vmpool",
            ],
            image=tango_image,
            timeout=10,
        )
        h = await mgr.submit(job)
        r = await finish(h)
    assert r.outcome is Outcome.SUCCESS and r.exit_status == 0 and r.retries == 0
    assert check_output(h, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 0",
        "autodriver=image's own",
        # Tango's command line: no vmpool options
        "args=-u 100 -f 104857600 -t 10 -o 1024000 /home/autograde/autolab",
        "autograde",
        # vmpool's own autodriver was not put in the container
        "ls: cannot access '/opt/vmpool': No such file or directory",
        "make: [Makefile:5: all] Error 2 (ignored)",
    ]


async def test_partial_output_of_a_running_job(dock: Dock) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        h = await mgr.submit(dock.job("partial", [
            "@echo first line",
            "@while [ ! -e release ]; do sleep 0.05; done",
            "@echo last line",
        ], timeout=20))
        # the job holds until released: its first line must show while it runs
        with anyio.fail_after(15):
            while True:
                if h.vm is not None and await drv.partialOutput(h.vm) == b"first line\n":
                    break
                await anyio.sleep(0.05)  # ok-sleep: watching a running job; bounded
        assert not h.done()
        await dock.exec_in(h.vm.driver_data["cid"], ["touch", "/home/autograde/autolab/release"])
        r = await finish(h)
    assert r.outcome is Outcome.SUCCESS
    assert read_lines(h)[-3:] == ["Autodriver: Job exited with status 0", "first line",
                                  "last line"]
