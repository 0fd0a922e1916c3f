"""The adversarial set, end to end through the local driver.

Manager -> pool -> scheduler -> LocalVMMS -> bubblewrap -> autodriver, on
this host, as root. Every test gets its own owner, state directory (in its
tmp dir) and range of sandbox uids (62000.. in steps of 50, apart from the
other test modules'), and afterwards nothing of it may be left: no process
of its uids, no uid claim, no cgroup, no sandbox directory (checked by the
``local`` fixture).

Jobs that must be caught "while running" tell the test so over TCP to a
listener on 127.0.0.1 (the Beacon): the tests wait on events, not on sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from vmpool import (
    InitializeVMError,
    InputFile,
    JobError,
    JobHandle,
    Manager,
    Outcome,
    Settings,
    TangoJob,
    TangoMachine,
)
from vmpool_drivers.local import LocalVMMS
from vmpool_drivers.local.driver import BubblewrapMissing
from vmpool_drivers.local.sandbox import Layout, detach, remove_netns

from .conftest import autograder_re
from .jobs import (
    CGROUP_BOMB_PY,
    DAEMON_PY,
    ELISION,
    FORK_BOMB_PY,
    MEMORY_BOMB_PY,
    driver_test_settings,
    finish,
    processes_of,
    read_lines,
    recipe_job,
    warm,
)

UID_BASE = 62000
UIDS = 50  # uids per test
IMAGE = "default"
MIB = 1024 * 1024
_slots = itertools.count()


# --------------------------------------------------------------------------
# Helpers


class TimedLocal(LocalVMMS):
    """The local driver, noting when each runJob starts (nothing else changes)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.runjob_started: dict[str, float] = {}

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        self.runjob_started[vm.instance_id or ""] = time.monotonic()
        return await super().runJob(vm, runTimeout, maxOutputFileSize, disableNetwork)




def disk_usage(root: Path) -> int:
    """Bytes of disk the files under ``root`` occupy (st_blocks, links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def files_larger_than(root: Path, limit: int) -> list[str]:
    big = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(p).st_size > limit:
                    big.append(p)
    return big




def check_output(h: JobHandle, closing: str, autodriver: list[str]) -> list[str]:
    """Assert Tango's lines, then that the autodriver's output starts with
    ``autodriver``; returns the autodriver's lines."""
    out = read_lines(h)
    assert len(out) >= 4, out
    assert re.fullmatch(autograder_re(f"Received job {h.job.name}:{h.id}"), out[0]), out
    assert re.fullmatch(autograder_re(closing), out[1]), out
    assert re.fullmatch(autograder_re("Here is the output from the autograder:"), out[2]), out
    assert out[3] == "---", out
    assert out[4 : 4 + len(autodriver)] == autodriver, out
    return out[4:]






BEACON_PY = """\
import socket, sys
path, token = sys.argv[1], sys.argv[2]
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(path)
except OSError as e:
    print("failed:", e.strerror or e, flush=True)
    sys.exit(0)
s.sendall(token.encode() + b"\\n")
print("connected", flush=True)
if sys.argv[3:] == ["hold"]:
    s.settimeout(None)
    s.recv(1)  # until the test releases us (or kills us)
"""


# Jobs reach no listener of the host's network (that is a wall under test),
# so they report over a unix socket in a directory every test driver binds
# into its sandboxes read-only (``extra_ro_paths``).
BEACON_ROOT = Path("/var/lib/vmpool-test-beacons")


class Beacon:
    """A unix socket listener that jobs report to: ``beacon.py PATH TOKEN [hold]``.

    Each connection sends one token line; with ``hold`` the job then waits
    until the test calls :meth:`release` (or the job is killed).
    """

    def __init__(self, path: str) -> None:
        self.port = path  # what a job passes to beacon.py
        self.connections = 0
        self.tokens: list[str] = []
        self._seen: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
        self._release: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)

    async def wait(self, token: str, limit: float = 20) -> None:
        with anyio.fail_after(limit):
            await self._seen[token].wait()

    def release(self, token: str) -> None:
        self._release[token].set()

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with stream:
            data = b""
            try:
                with anyio.fail_after(10):
                    while not data.endswith(b"\n"):
                        data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError):
                return
            token = data.decode().strip()
            self.tokens.append(token)
            self._seen[token].set()
            async with anyio.create_task_group() as tg:

                async def released() -> None:
                    await self._release[token].wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(released)
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        await stream.receive()
                tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def beacon() -> AsyncIterator[Beacon]:
    BEACON_ROOT.mkdir(mode=0o755, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=BEACON_ROOT))
    os.chmod(d, 0o755)
    path = d / "sock"
    listener = await anyio.create_unix_listener(path)
    os.chmod(path, 0o777)
    b = Beacon(str(path))
    try:
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, b.handle)
            try:
                yield b
            finally:
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Local:
    """One test's owner, state directory and uid range, and its job factory."""

    def __init__(self, tmp: Path, slot: int, *, tag: str = "tld", uid_base: int = UID_BASE,
                 uids: int = UIDS) -> None:
        self.tmp = tmp
        self.owner = f"{tag}{slot}-{os.getpid()}"
        self.state = tmp / "state"
        self.uid_base = uid_base + uids * slot
        self.uids = set(range(self.uid_base, self.uid_base + uids))
        self.extra_state_dirs: list[Path] = []
        (tmp / "out").mkdir()

    def driver(self, **kw: Any) -> TimedLocal:
        kw.setdefault("state_dir", str(self.state))
        kw.setdefault("extra_ro_paths", [str(BEACON_ROOT)])
        return TimedLocal(owner=self.owner, uid_base=self.uid_base, uid_count=UIDS, **kw)

    def settings(self, **kw: Any) -> Settings:
        return driver_test_settings("local", **kw)

    def job(
        self,
        name: str,
        recipe: list[str],
        files: dict[str, str] | None = None,
        **kw: Any,
    ) -> TangoJob:
        return recipe_job(self.tmp, name, IMAGE, recipe, files, **kw)

    def owner_dirs(self) -> list[Path]:
        return [s / self.owner for s in (self.state, *self.extra_state_dirs)]

    def cgroups(self) -> list[Path]:
        found: list[Path] = []
        for ctrl in ("pids", "memory", ""):
            parent = Path("/sys/fs/cgroup") / ctrl / "vmpool"
            if parent.is_dir():
                found.extend(parent.glob(f"vmpool-{self.owner}-*"))
        return found

    def claims(self) -> list[Path]:
        return [
            p for uid in sorted(self.uids) if (p := Path("/run/vmpool/uids") / str(uid)).exists()
        ]

    def leftovers(self) -> dict[str, list[str]]:
        left = {
            "processes": processes_of(self.uids),
            "uid claims": [str(p) for p in self.claims()],
            "cgroups": [str(p) for p in self.cgroups()],
            "sandboxes": [str(p) for d in self.owner_dirs() if d.is_dir() for p in d.iterdir()],
        }
        return {k: v for k, v in left.items() if v}

    async def clean(self) -> None:
        """Remove whatever a failed test left, so that it does not leak."""
        for state in (self.state, *self.extra_state_dirs):
            if (state / self.owner).is_dir():
                drv = self.driver(state_dir=str(state))
                for vm in await drv.getVMs():
                    with contextlib.suppress(Exception):
                        await drv.destroyVM(vm)
        for cg in self.cgroups():
            with contextlib.suppress(OSError):
                cg.rmdir()
        for claim in self.claims():
            shutil.rmtree(claim, ignore_errors=True)


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Local]:
    env = Local(tmp_path, next(_slots))
    # what a killed earlier run may have left in this uid range is not ours
    before = env.leftovers()
    yield env
    left = {
        k: new
        for k, v in env.leftovers().items()
        if (new := sorted(set(v) - set(before.get(k, []))))
    }
    if left:
        await env.clean()
    for d in env.extra_state_dirs:
        shutil.rmtree(d, ignore_errors=True)
    assert left == {}, f"left behind: {left}"


# --------------------------------------------------------------------------
# 1. hello


async def test_hello_runs_as_the_vms_uid_in_the_sandbox(local: Local) -> None:
    drv = local.driver()
    async with Manager(local.settings(), drivers={"local": drv}) as mgr:
        job = local.job("hello", ["@echo hello", "@id -u", "@hostname", "@pwd"], timeout=10)
        h = await mgr.submit(job)
        r = await finish(h)
        assert h.vm is not None
        uid, instance = h.vm.driver_data["uid"], h.vm.instance_id
    assert instance == f"{drv.owner}/local-{h.vm.id}-default"  # unique across owners
    assert r.outcome is Outcome.SUCCESS and r.exit_status == 0 and r.retries == 0
    assert r.steps == {"waitvm": 0, "copyin": 0, "runjob": 0, "copyout": 0}
    assert check_output(h, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 0",
        "hello",
        str(uid),
        instance.partition("/")[2],  # the hostname: the sandbox's name
        "/home/autograde/autolab",
    ]
    assert uid != 0 and uid in local.uids
    assert instance.partition("/")[2] == f"local-{h.vm.id}-default" != socket.gethostname()
    # the output file only: no temporary file beside it
    assert [p.name for p in (local.tmp / "out").iterdir()] == ["hello.out"]


# --------------------------------------------------------------------------
# 2 and 7. timeouts: a busy loop, a job ignoring SIGTERM


@pytest.mark.parametrize(
    "recipe",
    [
        ["@echo started", "@while :; do :; done"],
        ["@echo started", "@trap '' TERM HUP INT; while :; do :; done"],
    ],
    ids=["busy-loop", "ignores-sigterm"],
)
async def test_timeout_stops_the_job_and_all_its_processes(local: Local, recipe: list[str]) -> None:
    drv = local.driver()
    async with Manager(local.settings(), drivers={"local": drv}) as mgr:
        await warm(mgr, IMAGE)
        h = await mgr.submit(local.job("loop", recipe, timeout=1))
        r = await finish(h)
        assert h.vm is not None and h.vm.instance_id is not None
        uid = h.vm.driver_data["uid"]
        left = processes_of({uid})  # right away: before the VM is destroyed
        took = r.finished_at - drv.runjob_started[h.vm.instance_id]
    assert r.outcome is Outcome.TIMEOUT and r.exit_status == 2 and r.retries == 0
    assert check_output(h, "Error: Job timed out after 1 seconds", []) == [
        "Autodriver: Job timed out after 1 seconds",
        "started",
    ]
    assert 1 <= took < 1 + 2, took
    assert left == []


# --------------------------------------------------------------------------
# 3. fork bomb



@pytest.mark.parametrize(
    ("nproc", "pids_max"), [(40, 1024), (1000, 60)], ids=["nproc-binds", "cgroup-pids-binds"]
)
async def test_fork_bomb_is_contained(local: Local, nproc: int, pids_max: int) -> None:
    drv = local.driver(nproc=nproc, pids_max=pids_max)
    assert drv.cgroups is not None  # the pids limit is part of what is tested
    async with Manager(local.settings(), drivers={"local": drv}) as mgr:
        await warm(mgr, IMAGE)
        (vm,) = mgr.inventory()
        uid = vm.driver_data["uid"]
        cg = drv._cgroup(vm)
        assert cg is not None
        job = local.job("bomb", ["@python3 bomb.py"], {"bomb.py": FORK_BOMB_PY}, timeout=2)
        start = time.monotonic()
        h = await mgr.submit(job)
        counts, in_cgroup, latencies = [], [], []
        while not h.done():
            counts.append(len(processes_of({uid})))
            in_cgroup.append(len(cg.pids()))
            t = time.monotonic()
            await anyio.run_process(["true"])  # is the machine responsive?
            latencies.append(time.monotonic() - t)
            with anyio.move_on_after(0.1):  # measure every 0.1 s until the job ends
                await h.wait()
        r = await finish(h)
        elapsed = time.monotonic() - start
        left = processes_of({uid})
    print(
        f"fork bomb: {elapsed:.2f}s, max {max(counts)} processes of the uid, "
        f"max {max(in_cgroup)} in the cgroup, worst latency {max(latencies) * 1000:.0f} ms"
    )
    assert r.outcome is Outcome.TIMEOUT and r.retries == 0
    assert check_output(h, "Error: Job timed out after 2 seconds", []) == [
        "Autodriver: Job timed out after 2 seconds",
        "bombing",
    ]
    assert elapsed < 2 + 2
    # RLIMIT_NPROC (+ the autodriver's kill helper), and the cgroup's pids.max
    # (which also counts the sandbox's own processes)
    assert max(counts) <= min(nproc + 1, pids_max)
    assert max(in_cgroup) <= pids_max
    assert max(in_cgroup) >= min(nproc, pids_max) - 5  # the bomb did reach the limit
    assert max(latencies) < 1
    assert left == []


# --------------------------------------------------------------------------
# 4. output flood


async def test_output_flood_is_capped_and_never_reaches_the_disk(local: Local) -> None:
    cap = 100_000
    drv = local.driver()
    settings = local.settings(reuse_vms=True)
    async with Manager(settings, drivers={"local": drv}) as mgr:
        await warm(mgr, IMAGE)
        before = disk_usage(local.state)
        job = local.job(
            "flood",
            ["@head -c 1000000000 /dev/zero | tr '\\0' a", "@echo", "@echo LAST-LINE"],
            timeout=60,
            max_output=cap,
        )
        h = await mgr.submit(job)
        usage = [before]
        while not h.done():
            usage.append(disk_usage(local.state))
            with anyio.move_on_after(0.2):  # sample every 0.2 s until the job ends
                await h.wait()
        r = await finish(h, 90)
        usage.append(disk_usage(local.state))
        big = files_larger_than(local.state, cap + 1024)
    print(
        f"flood: {r.finished_at - r.submitted_at:.2f}s, state dir grew by at most "
        f"{max(usage) - before} bytes"
    )
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    check_output(
        h, "Success: Autodriver returned normally", ["Autodriver: Job exited with status 0"]
    )
    data = Path(h.job.outputFile).read_bytes()
    body = data[data.index(b"---\n") + 4 :]
    tail = b"a" * (cap // 2 - len(b"\nLAST-LINE\n")) + b"\nLAST-LINE\n"
    assert body == b"Autodriver: Job exited with status 0\n" + b"a" * (cap // 2) + ELISION + tail
    assert len(data) <= cap + len(ELISION) + 400
    assert max(usage) - before <= cap + 64 * 1024
    assert big == []


# --------------------------------------------------------------------------
# 5. memory bombs


# Four processes of 40 MB each: every one fits the per-process limit
# (RLIMIT_AS 64 MiB), together they exceed the sandbox's cgroup (64 + 64 MiB),
# so the cgroup's OOM killer, not the rlimit, stops them.


@pytest.mark.parametrize(
    ("script", "says"),
    [
        (MEMORY_BOMB_PY, "MemoryError"),
        (CGROUP_BOMB_PY, "a child was killed by signal 9"),
    ],
    ids=["one-process", "many-processes-cgroup-oom"],
)
async def test_memory_bomb_is_killed_and_reported(local: Local, script: str, says: str) -> None:
    drv = local.driver()
    assert drv.cgroups is not None
    async with Manager(local.settings(), drivers={"local": drv}) as mgr:
        job = local.job("mem", ["@python3 bomb.py"], {"bomb.py": script}, timeout=20, memory=64)
        h = await mgr.submit(job)
        r = await finish(h)
        assert h.vm is not None and h.vm.memory == 64
        left = processes_of({h.vm.driver_data["uid"]})
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    out = check_output(
        h,
        "Success: Autodriver returned normally",
        [
            "Autodriver: Job exited with status 2",
            f"Autodriver: memory limit of {64 * MIB} bytes exceeded",
        ],
    )
    assert says in out
    assert r.finished_at - r.submitted_at < 15
    assert left == []


# --------------------------------------------------------------------------
# 6. setsid and daemons



async def test_setsid_and_daemons_do_not_outlive_the_job(local: Local) -> None:
    drv = local.driver()
    # reused VMs: the sandbox stays, so only the job's end may kill them
    async with Manager(local.settings(reuse_vms=True), drivers={"local": drv}) as mgr:
        await warm(mgr, IMAGE)
        job = local.job(
            "daemons",
            [
                "@setsid sleep 1000 &",
                "@setsid sleep 1001 </dev/null >/dev/null 2>&1 &",
                "@python3 daemon.py",
                "@echo recipe done",
            ],
            {"daemon.py": DAEMON_PY},
            timeout=20,
        )
        h = await mgr.submit(job)
        r = await finish(h)
        assert h.vm is not None
        uid = h.vm.driver_data["uid"]
        left = processes_of({uid})
        (vm,) = mgr.inventory()  # the VM went back to the pool
        assert vm.instance_id == h.vm.instance_id
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    out = check_output(
        h, "Success: Autodriver returned normally", ["Autodriver: Job exited with status 0"]
    )
    # (the daemon runs alongside the last recipe line: their output may interleave)
    text = "\n".join(out)
    assert "daemon up" in text and "recipe done" in text
    assert r.finished_at - r.submitted_at < 5  # did not wait for the sleepers
    assert left == []


# --------------------------------------------------------------------------
# 8. file size limit


async def test_file_size_limit(local: Local) -> None:
    limit = 1_000_000
    drv = local.driver(fsize=limit)
    async with Manager(local.settings(reuse_vms=True), drivers={"local": drv}) as mgr:
        job = local.job(
            "fsize", ["-dd if=/dev/zero of=big bs=1M count=5", "@stat -c size=%s big"], timeout=20
        )
        h = await mgr.submit(job)
        r = await finish(h)
        big = files_larger_than(local.state, limit)
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    out = check_output(
        h, "Success: Autodriver returned normally", ["Autodriver: Job exited with status 0"]
    )
    assert any("File size limit exceeded" in line for line in out), out
    sizes = [int(m.group(1)) for line in out if (m := re.fullmatch(r"size=(\d+)", line))]
    assert sizes and sizes[0] <= limit, out
    assert big == []


# --------------------------------------------------------------------------
# 9. network


NET_PROBE_PY = """\\
import socket, subprocess, sys
p4, p6 = int(sys.argv[1]), int(sys.argv[2])
for family, host, port in ((socket.AF_INET, "127.0.0.1", p4), (socket.AF_INET6, "::1", p6)):
    s = socket.socket(family)
    s.settimeout(2)
    try:
        s.connect((host, port))
        print("host", host, "reached")
    except OSError as e:
        print("host", host, "not reached")
    s.close()
# a listener in the job's own namespace works
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
c = socket.create_connection(srv.getsockname(), timeout=2)
a, _ = srv.accept()
c.sendall(b"x")
print("own listener", a.recv(1).decode())
links = sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:])
print("links", " ".join(links))
# the route to cloud metadata (no packet is sent to find it)
r = subprocess.run(["ip", "route", "get", "169.254.169.254"], capture_output=True, text=True)
print("metadata route", "unreachable" if r.returncode or "unreachable" in r.stdout else "open")
"""


@contextlib.asynccontextmanager
async def host_listeners() -> AsyncIterator[tuple[int, int, list[str]]]:
    """TCP listeners on the host's 127.0.0.1 and ::1; yields their ports and
    a list that every connection is noted in."""
    seen: list[str] = []

    async def note(stream: anyio.abc.SocketStream) -> None:
        seen.append(str(stream.extra(anyio.abc.SocketAttribute.remote_address)))
        await stream.aclose()

    l4 = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    l6 = await anyio.create_tcp_listener(local_host="::1", local_port=0)
    p4 = l4.extra(anyio.abc.SocketAttribute.local_port)
    p6 = l6.extra(anyio.abc.SocketAttribute.local_port)
    async with l4, l6, anyio.create_task_group() as tg:
        tg.start_soon(l4.serve, note)
        tg.start_soon(l6.serve, note)
        try:
            yield p4, p6, seen
        finally:
            tg.cancel_scope.cancel()


async def test_network_never_reaches_the_host(local: Local) -> None:
    """Network off: a namespace with only lo. Network on: the VM's own
    namespace (pasta's interface for outbound access), where the host's
    loopback is not reachable and link-local (cloud metadata) is unreachable;
    a listener of the job's own works either way."""
    drv = local.driver()
    assert drv.network == "pasta"
    async with host_listeners() as (p4, p6, seen), Manager(
        local.settings(pool_size=1), drivers={"local": drv}
    ) as mgr:
        results = {}
        for net_off in (True, False):
            job = local.job(f"net-{'off' if net_off else 'on'}",
                            [f"@python3 probe.py {p4} {p6}"], {"probe.py": NET_PROBE_PY},
                            timeout=20, disable_network=net_off)
            h = await mgr.submit(job)
            r = await finish(h)
            assert r.outcome is Outcome.SUCCESS, read_lines(h)
            results[net_off] = check_output(
                h, "Success: Autodriver returned normally", ["Autodriver: Job exited with status 0"]
            )[1:]
    assert seen == [], f"the host's listeners were reached: {seen}"
    common = ["host 127.0.0.1 not reached", "host ::1 not reached", "own listener x"]
    assert results[True] == [*common, "links lo", "metadata route unreachable"], results[True]
    on = results[False]
    assert on[:3] == common and on[4] == "metadata route unreachable", on
    links = on[3].split()[1:]
    assert "lo" in links and len(links) == 2, on  # lo and pasta's interface


# --------------------------------------------------------------------------
# 10. another job's directory and processes


async def test_a_job_cannot_see_another_running_job(local: Local) -> None:
    drv = local.driver()
    async with beacon() as b, Manager(local.settings(pool_size=2), drivers={"local": drv}) as mgr:
        await warm(mgr, IMAGE, 2)
        a = local.job(
            "job-a",
            [
                "@echo $$((40 + 2))-answer > secret.txt",
                f"@python3 beacon.py {b.port} a-ready hold",
                "@echo a-done",
            ],
            {"beacon.py": BEACON_PY},
            timeout=60,
            disable_network=False,
        )
        h_a = await mgr.submit(a)
        await b.wait("a-ready")  # A runs, its secret in its job directory
        assert h_a.vm is not None
        a_dir = Path(h_a.vm.driver_data["dir"])
        assert (a_dir / "fs" / "job" / "secret.txt").read_text() == "42-answer\n"
        b_job = local.job(
            "job-b",
            [
                f"-ls {local.state}",
                f"-ls {a_dir}",
                f"-cat {a_dir}/fs/job/secret.txt",
                "@ls /home",
                "@ls -A /home/autograde/autolab",
                "@cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo",
                "-@grep -rs 4$$(echo 2)-answer /tmp /var/tmp /dev/shm /home; echo grep $$?",
            ],
            timeout=20,
        )
        h_b = await mgr.submit(b_job)
        r_b = await finish(h_b)
        assert not h_a.done()  # A was running all along
        assert (a_dir / "fs" / "job" / "secret.txt").exists()
        b.release("a-ready")
        r_a = await finish(h_a)
    assert r_a.outcome is r_b.outcome is Outcome.SUCCESS
    check_output(
        h_a,
        "Success: Autodriver returned normally",
        ["Autodriver: Job exited with status 0", "connected", "a-done"],
    )
    out = check_output(
        h_b, "Success: Autodriver returned normally", ["Autodriver: Job exited with status 0"]
    )
    text = "\n".join(out)
    assert f"ls: cannot access '{local.state}': No such file or directory" in out
    assert f"ls: cannot access '{a_dir}': No such file or directory" in out
    assert f"cat: {a_dir}/fs/job/secret.txt: No such file or directory" in out
    assert "autograde" in out  # ls /home: the sandbox's own home only
    assert "secret.txt" not in out
    assert "42-answer" not in text and "a-ready" not in text and "beacon.py" not in text
    assert "grep 1" in out  # no file with A's secret anywhere B can reach
    assert h_a.vm is not None and h_b.vm is not None
    assert h_a.vm.driver_data["uid"] != h_b.vm.driver_data["uid"]


# --------------------------------------------------------------------------
# 11. a destFile escaping the job directory


async def test_dest_file_with_dotdot_is_refused(local: Local) -> None:
    drv = local.driver()
    assert not Path("/etc/x").exists()
    async with Manager(local.settings(), drivers={"local": drv}) as mgr:
        await warm(mgr, IMAGE)
        owner_dir = local.state / local.owner
        sandboxes = sorted(owner_dir.iterdir())
        job = local.job("escape", ["@echo hello"])
        job.input.append(InputFile(job.input[0].localFile, "../../etc/x"))
        with pytest.raises(JobError, match=re.escape("destFile '../../etc/x' contains '..'")):
            await mgr.submit(job)
        assert sorted(owner_dir.iterdir()) == sandboxes  # no VM made for it
        # every unsafe form is refused at submit (the drivers' copyIn relies
        # on it), each one named
        for i, dest in enumerate(("../etc/passwd", "/etc/x", "a/../../x")):
            bad = local.job(f"escape-{i}", ["@echo hello"])
            bad.input.append(InputFile(bad.input[0].localFile, dest))
            with pytest.raises(JobError, match=re.escape(f"destFile {dest!r}")):
                await mgr.submit(bad)
        assert sorted(owner_dir.iterdir()) == sandboxes
        assert mgr.scheduler.counters.job_requests == 0
    assert not Path("/etc/x").exists()


# --------------------------------------------------------------------------
# 12. crash recovery


async def test_sandboxes_of_a_crashed_manager_are_removed_on_startup(local: Local) -> None:
    crashed = local.driver()
    assert crashed.cgroups is not None
    old = []
    for i in (1, 2):
        vm = TangoMachine(name=IMAGE, image=IMAGE, id=i)
        await crashed.initializeVM(vm)
        await crashed.waitVM(vm, 20)
        old.append(vm)
    cgroup_dirs = [d for vm in old for d in crashed._cgroup(vm).dirs.values()]  # type: ignore[union-attr]
    assert all(d.is_dir() for d in cgroup_dirs)
    # a job process that outlived its manager, in the first sandbox's cgroup
    uid = old[0].driver_data["uid"]
    leftover = await anyio.open_process(
        ["sleep", "1000"],
        user=uid,
        group=uid,
        extra_groups=[],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for procs in crashed._cgroup(old[0]).procs_files():  # type: ignore[union-attr]
        Path(procs).write_text(str(leftover.pid))
    try:
        assert processes_of({uid}) != []
        await crashed.close()  # the crash: the driver is gone (its lock too), its sandboxes stay
        # a new manager, same owner and state directory
        drv = local.driver()
        async with Manager(local.settings(pool_size=2), drivers={"local": drv}) as mgr:
            # reconciled on startup: before any pool of this run exists
            for vm in old:
                assert not Path(vm.driver_data["dir"]).exists()
                assert not (drv.uid_dir / str(vm.driver_data["uid"])).exists()
            assert not any(d.exists() for d in cgroup_dirs)
            with anyio.fail_after(5):
                assert await leftover.wait() == -9
            assert processes_of({vm.driver_data["uid"] for vm in old}) == []
            assert await drv.getVMs() == []
            await warm(mgr, IMAGE, 2)
            found = await drv.getVMs()
            assert sorted(vm.instance_id or "" for vm in found) == sorted(
                vm.instance_id or "" for vm in mgr.inventory()
            )
            assert sorted(vm.id or 0 for vm in found) == [3, 4]  # above the old ids
    finally:
        if leftover.returncode is None:
            leftover.kill()
        await leftover.aclose()


# --------------------------------------------------------------------------
# 13. closing the manager


async def test_close_leaves_nothing(local: Local) -> None:
    drv = local.driver()
    used: set[int] = set()
    async with beacon() as b:
        async with Manager(local.settings(pool_size=2), drivers={"local": drv}) as mgr:
            await warm(mgr, IMAGE, 2)
            used |= {vm.driver_data["uid"] for vm in mgr.inventory()}
            done = await mgr.submit(local.job("quick", ["@echo quick"], timeout=10))
            busy = await mgr.submit(
                local.job(
                    "busy",
                    [f"@python3 beacon.py {b.port} busy hold", "@sleep 1000"],
                    {"beacon.py": BEACON_PY},
                    timeout=60,
                    disable_network=False,
                )
            )
            assert (await finish(done)).outcome is Outcome.SUCCESS
            await b.wait("busy")  # running when the manager exits
            # (a refill VM still being made has no uid yet)
            used |= {u for vm in mgr.inventory() if (u := vm.driver_data.get("uid"))}
            assert done.vm is not None and busy.vm is not None
            assert busy.vm.driver_data["uid"] in used
            used.add(done.vm.driver_data["uid"])
        assert busy.result is not None and busy.result.outcome is Outcome.CANCELLED
    assert check_output(busy, "Error: Job cancelled (vmpool is shutting down)", []) == []
    assert not (local.state / local.owner).exists()  # removed with its last sandbox
    assert not (local.state / f"{local.owner}.lock").exists()
    assert local.cgroups() == []
    assert [p for p in (drv.uid_dir / str(u) for u in used) if p.exists()] == []
    assert processes_of(used) == []


# --------------------------------------------------------------------------
# 14. without bubblewrap


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    old = os.environ["PATH"]
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    yield old


async def test_without_bubblewrap(
    local: Local, empty_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert shutil.which("bwrap") is None
    with pytest.raises(BubblewrapMissing, match=re.escape("apt-get install bubblewrap")):
        local.driver()
    # the degraded mode runs jobs on the host as their uid: the state
    # directory must be reachable by other users
    closed = local.tmp / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    with pytest.raises(InitializeVMError, match="is not searchable by other users"):
        local.driver(sandbox="rlimits", state_dir=str(closed / "state"))
    local.extra_state_dirs.append(closed / "state")
    state = Path(tempfile.mkdtemp(prefix="vmpool-local-test-"))
    local.extra_state_dirs.append(state)
    drv = local.driver(sandbox="rlimits", state_dir=str(state))
    assert drv.bwrap is None and drv.sandbox == "rlimits"
    monkeypatch.setenv("PATH", empty_path)  # make and python3 for the job
    async with Manager(local.settings(), drivers={"local": drv}) as mgr:
        h = await mgr.submit(local.job("degraded", ["@echo hello", "@id -u", "@pwd"], timeout=10))
        r = await finish(h)
        assert h.vm is not None
        uid = h.vm.driver_data["uid"]
        job_dir = Path(h.vm.driver_data["job"])
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    assert check_output(h, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 0",
        "hello",
        str(uid),
        str(job_dir),
    ]
    assert uid in local.uids
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    assert not (state / local.owner).exists() or list((state / local.owner).iterdir()) == []


# --------------------------------------------------------------------------
# 15. a relative state directory


async def test_relative_state_dir_is_made_absolute(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox hides the state directory by its path: a relative one
    was not hidden (and would break with the first chdir)."""
    monkeypatch.chdir(local.tmp)
    drv = local.driver(state_dir="state")
    assert drv.state_dir == local.state
    monkeypatch.chdir("/")
    async with Manager(local.settings(), drivers={"local": drv}) as mgr:
        h = await mgr.submit(local.job("relative", ["@pwd"], timeout=10))
        r = await finish(h)
        assert h.vm is not None
        assert Path(h.vm.driver_data["dir"]).parent == local.state / local.owner
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    assert check_output(h, "Success: Autodriver returned normally", []) == [
        "Autodriver: Job exited with status 0",
        "/home/autograde/autolab",
    ]


async def test_stale_uid_claims_of_this_owner_are_released(local: Local) -> None:
    drv = local.driver()
    vm = TangoMachine(name=IMAGE, image=IMAGE, id=1)
    await drv.initializeVM(vm)
    uid = vm.driver_data["uid"]
    claim = drv.uid_dir / str(uid)
    # a crash between removing the sandbox and releasing its uid
    sandbox_dir = Layout(Path(vm.driver_data["dir"]))
    remove_netns(sandbox_dir)
    detach(sandbox_dir.fs)
    shutil.rmtree(sandbox_dir.d)
    # another owner's claim for a sandbox we know nothing of stays
    other = drv.uid_dir / str(local.uid_base + UIDS - 1)
    other.mkdir()
    (other / "owner").write_text("someone-else/local-9-default\n")
    try:
        assert claim.exists()
        local.driver()
        assert not claim.exists()
        assert other.exists()
    finally:
        shutil.rmtree(other, ignore_errors=True)
        await drv.destroyVM(vm)


async def test_copy_in_never_follows_a_planted_link(local: Local, tmp_path: Path) -> None:
    drv = local.driver()
    vm = TangoMachine(name=IMAGE, image=IMAGE, id=1)
    await drv.initializeVM(vm)
    try:
        job = Path(vm.driver_data["job"])
        outside = tmp_path / "outside"
        outside.mkdir()
        # what a previous job on a reused sandbox could have left
        (job / "sub").symlink_to(outside)
        (job / "Makefile").symlink_to(outside / "target")
        src = tmp_path / "src"
        src.write_text("data\n")
        await drv.copyIn(vm, [InputFile(str(src), "sub/Makefile"),
                              InputFile(str(src), "Makefile")])
        assert list(outside.iterdir()) == [] and outside.stat().st_uid == 0
        assert not (job / "sub").is_symlink() and (job / "sub" / "Makefile").read_text() == "data\n"
        assert not (job / "Makefile").is_symlink()
        assert (job / "sub").stat().st_uid == vm.driver_data["uid"]
    finally:
        await drv.destroyVM(vm)
