"""Sandboxes that hold (issue 8), on the Docker driver and a REAL engine.

One test per wall: the job's environment, its capabilities, the kernel calls
the autodriver's seccomp filter refuses (shown in a container whose engine
profile is "unconfined", so that only the autodriver's wall stands), its
disk and inode quotas, CPU and per-uid process limits next to a busy
neighbour, a host uid of its own per container (and its release), and
memory held in files that never costs the job its output.

The fixtures and helpers are the adversarial set's (tests/test_docker_driver.py).
As there, nothing waits by sleeping: jobs that must overlap hold until the
test releases them (a file in their job directory), and "the job's processes
run" is seen in this host's /proc (bounded waits).
"""

from __future__ import annotations

import os
import pwd
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import pytest

from vmpool import JobHandle, Manager, Outcome, TangoMachine
from vmpool_drivers.policy import UID_DIR, UidRegistry, file_quotas

from .jobs import HOG_PY, MEMORY_BOMB_PY, finish, read_lines, warm
from .test_docker_driver import (
    IMAGE,
    MIB,
    Dock,
    Probe,
    check_output,
    dock,
    processes_in,
)

__all__ = ["dock"]  # the fixture, used by name

UID_BASE, UID_COUNT = 61000, 2000
JOB_DIR = "/home/autograde/autolab"
# variables make itself puts in a recipe's environment
MAKE_OWN = {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}
DOCKER_ROOT = "/var/lib/vmpool-docker"  # scripts/docker-up.sh's --data-root


def body(h: JobHandle) -> list[str]:
    """The autodriver's lines of a job's output file (after Tango's ``---``)."""
    lines = read_lines(h)
    return lines[lines.index("---") + 1 :]


def job_lines(h: JobHandle, *prefix: str) -> list[str]:
    """Check a successful job's Tango lines and the autodriver's first lines
    (``prefix``); return the job's own output after them."""
    return check_output(h, "Success: Autodriver returned normally", list(prefix))[len(prefix):]


def claims_of(owner: str) -> dict[int, str]:
    """uid -> holder of the Docker driver's claims for ``owner``."""
    if not os.path.isdir(UID_DIR):
        return {}
    return dict(UidRegistry(UID_BASE, UID_COUNT).claims(f"docker:{owner}/"))


async def wait_for_processes(
    cid: str, name: str, n: int, uid: int | None = None, limit: float = 20
) -> list[str]:
    """Wait until ``n`` processes called ``name`` (of ``uid``) run in container ``cid``."""
    with anyio.fail_after(limit):
        while True:
            found = [p for p in processes_in(cid) if p.split()[2:] == [name]
                     and (uid is None or p.split()[1] == str(uid))]
            if len(found) >= n:
                return found
            await anyio.sleep(0.05)  # ok-sleep: no event says a process started; bounded


async def release(dock: Dock, h: JobHandle) -> None:
    assert h.vm is not None
    await dock.exec_in(h.vm.driver_data["cid"], ["touch", f"{JOB_DIR}/release"])


class Counting(Probe):
    """The Docker driver, with an event set once ``n`` runJobs have begun."""

    def __init__(self, n: int = 1, **kw: Any) -> None:
        super().__init__(**kw)
        self.n = n
        self.started = anyio.Event()

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        self.runjob_started[vm.id or 0] = time.monotonic()
        if len(self.runjob_started) >= self.n:
            self.started.set()
        return await super().runJob(vm, runTimeout, maxOutputFileSize, disableNetwork)


HOLD = "@while [ ! -e release ]; do sleep 0.05; done"  # until the test releases it


# --------------------------------------------------------------------------
# 1. the environment: short, explicit, never the server's

ENV_PY = "import os; [print(k + '=' + v) for k, v in sorted(os.environ.items())]"


@pytest.fixture
async def env_image(dock: Dock) -> AsyncIterator[str]:
    """vmpool/grader with an ENV of its own (what a Java course's image declares)."""
    tag = f"env{os.getpid()}-{dock.owner}"
    async with aiodocker.Docker(url=dock.host) as docker:
        base = await docker.containers.create(
            {"Image": IMAGE, "Cmd": ["tail", "-f", "/dev/null"]}, name=f"{dock.owner}-envbase"
        )
        try:
            await base.commit(repository="vmpool/grader-env", tag=tag,
                              changes=["ENV JAVA_HOME=/usr/lib/jvm/course"])
        finally:
            await base.delete(force=True)
        try:
            yield f"vmpool/grader-env:{tag}"
        finally:
            await docker.images.delete(f"vmpool/grader-env:{tag}", force=True)


async def test_the_job_sees_a_short_explicit_environment(
    dock: Dock, env_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the "server's" own environment: a secret that must never reach a job
    monkeypatch.setenv("VMPOOL_SERVER_SECRET", "s3cret-of-the-server")
    drv = dock.driver(env={"COURSE": "15-213"})
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        h = await mgr.submit(dock.job("env", [f'@python3 -c "{ENV_PY}"'], image=env_image,
                                      timeout=20))
        r = await finish(h)
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    lines = job_lines(h, "Autodriver: Job exited with status 0")
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert set(env) - MAKE_OWN == {
        "PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TERM", "PWD",
        "JAVA_HOME",  # the image's
        "COURSE",  # the pool's
    }, env
    assert env["JAVA_HOME"] == "/usr/lib/jvm/course" and env["COURSE"] == "15-213"
    assert env["HOME"] == "/home/autograde" and env["USER"] == env["LOGNAME"] == "autograde"
    assert env["TERM"] == "dumb" and env["LANG"] == env["LC_ALL"] == "C.UTF-8"
    assert env["PWD"] == JOB_DIR
    assert "/usr/bin" in env["PATH"].split(":")
    assert "s3cret-of-the-server" not in Path(h.job.outputFile).read_text()


# --------------------------------------------------------------------------
# 2. capabilities: none for the job, never DAC_READ_SEARCH in the container

CAP_DAC_READ_SEARCH = 2
CAP_SYS_ADMIN = 21


async def test_no_capability_for_the_job_and_no_dac_read_search(dock: Dock) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        (vm,) = mgr.inventory()
        info = await dock.inspect(vm.instance_id or "")
        h = await mgr.submit(dock.job("caps", [
            "@grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status",
            "@grep -E '^CapBnd' /proc/1/status",  # the container's bounding set
        ], timeout=20))
        r = await finish(h)
    assert r.outcome is Outcome.SUCCESS
    lines = job_lines(h, "Autodriver: Job exited with status 0")
    caps = [(k, int(v, 16)) for k, v in (line.split(":\t") for line in lines)]
    assert [k for k, _ in caps] == ["CapPrm", "CapEff", "CapBnd", "CapBnd"], lines
    assert caps[0][1] == caps[1][1] == 0  # the job: no capability at all
    for _, bounding in caps[2:]:
        assert not bounding & (1 << CAP_DAC_READ_SEARCH), lines
        assert not bounding & (1 << CAP_SYS_ADMIN), lines
    assert info is not None
    assert "DAC_READ_SEARCH" not in (info["HostConfig"]["CapAdd"] or [])
    assert info["HostConfig"]["CapDrop"] == ["ALL"]


# --------------------------------------------------------------------------
# 3. no new kernel attack surface: the autodriver's filter holds on its own

KEYCTL_PY = (
    "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
    "r = libc.syscall(250, 0, -3, 0); "  # keyctl(KEYCTL_GET_KEYRING_ID, session, 0), x86_64
    "print('keyctl:', 'ok' if r >= 0 else os.strerror(ctypes.get_errno()))"
)
SURFACE = [
    "-@unshare -U true; echo unshare=$$?",
    f'@python3 -c "{KEYCTL_PY}"',
]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86_64")
async def test_no_namespaces_nor_keyring_even_without_the_engines_seccomp(dock: Dock) -> None:
    drv = dock.driver(seccomp_profile="unconfined")
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        (vm,) = mgr.inventory()
        cid = vm.instance_id or ""
        info = await dock.inspect(cid)
        # The engine refuses none of it here: as root in this very container
        # (no capability needed for a user namespace nor a keyring lookup).
        control = await dock.exec_in(cid, ["sh", "-c", "unshare -U true; echo unshare=$?; "
                                           f'python3 -c "{KEYCTL_PY}"'])
        h = await mgr.submit(dock.job("surface", SURFACE, timeout=20))
        r = await finish(h)
    assert info is not None and "seccomp=unconfined" in info["HostConfig"]["SecurityOpt"]
    assert control.splitlines() == ["unshare=0", "keyctl: ok"], control
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    assert job_lines(h, "Autodriver: Job exited with status 0") == [
        "unshare: unshare failed: Operation not permitted",
        "unshare=1",
        "keyctl: Operation not permitted",
    ]


async def test_the_engines_default_seccomp_profile_is_kept(dock: Dock) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        (vm,) = mgr.inventory()
        info = await dock.inspect(vm.instance_id or "")
    assert info is not None
    opts = info["HostConfig"]["SecurityOpt"]
    assert "no-new-privileges" in opts and not [o for o in opts if o.startswith("seccomp")]


# --------------------------------------------------------------------------
# 4. quotas: bytes and inodes, in memory, never on the host's disk

FILL = (
    "@for d in . /tmp /var/tmp /dev/shm; do i=0; "
    "while [ $$i -lt 8 ] && head -c 67108864 /dev/zero > $$d/f$$i 2>/dev/null; "
    "do i=$$((i+1)); done; echo $$d: $$i; done"
)


def whole_files(size: int, chunk: int, where: str) -> int:
    """How many files of ``chunk`` bytes a file system of ``size`` takes (the
    job directory also holds the job's own few files, a page each)."""
    return (size - 1 if where == "." else size) // chunk


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def test_a_job_writing_2_gib_is_stopped_at_its_disk_quota(dock: Dock) -> None:
    quota = 256 * MIB
    drv = dock.driver(disk_quota=quota)  # memory 1 GiB: above the quota
    shares = file_quotas(1024 * MIB, quota, drv.inode_quota)
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE)
        before = free_bytes(DOCKER_ROOT)
        # 4 x 8 x 64 MiB = 2 GiB, in the job directory, /tmp, /var/tmp, /dev/shm
        h = await mgr.submit(dock.job("fill", [FILL], timeout=60))
        r = await finish(h, 90)
        after = free_bytes(DOCKER_ROOT)
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    sizes = [shares[role][0] for role in ("home", "tmp", "var_tmp", "shm")]
    assert sum(sizes) <= quota
    assert job_lines(
        h,
        "Autodriver: Job exited with status 0",
        *(f"Autodriver: disk quota of {size} bytes exceeded" for size in sizes),
    ) == [
        # each file system took what its share holds, in whole 64 MiB files
        *(f"{d}: {whole_files(size, 64 * MIB, d)}" for d, size in zip(
            (".", "/tmp", "/var/tmp", "/dev/shm"), sizes, strict=True)),
    ]
    # nothing of it reached the host's disk (the engine's data root)
    assert before - after < 8 * MIB, (before - after) / MIB


CREATE_PY = """\
import os
n = 0
try:
    for n in range(200_000):
        open("f%d" % n, "w").close()
    n = 200_000
except OSError as e:
    print("created", n, "files:", e.strerror)
"""


async def test_a_job_creating_200000_files_is_stopped_at_its_inode_quota(dock: Dock) -> None:
    drv = dock.driver()  # the default quotas, memory 1 GiB
    inodes = file_quotas(1024 * MIB, drv.disk_quota, drv.inode_quota)["home"][1]
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        h = await mgr.submit(dock.job("files", ["@python3 create.py"], {"create.py": CREATE_PY},
                                      timeout=60))
        r = await finish(h, 90)
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    out = job_lines(
        h,
        "Autodriver: Job exited with status 0",
        f"Autodriver: inode quota of {inodes} files exceeded",
    )
    assert len(out) == 1 and re.fullmatch(r"created (\d+) files: No space left on device",
                                          out[0]), out
    created = int(out[0].split()[1])
    assert inodes - 10 <= created < inodes <= 100_000


async def test_nothing_else_on_the_root_file_system_is_writable(dock: Dock) -> None:
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        h = await mgr.submit(dock.job("writable", [
            # as the grading user: what it may write on the container's own
            # file system (-xdev: the tmpfs mounts show as their mount point)
            "@find / -xdev -writable ! -type l 2>/dev/null | sort",
            "@stat -f -c '%n %T' /home/autograde /tmp /var/tmp /dev/shm",
        ], timeout=30))
        r = await finish(h, 60)
    assert r.outcome is Outcome.SUCCESS
    assert job_lines(h, "Autodriver: Job exited with status 0") == [
        "/home/autograde",
        "/tmp",
        "/var/tmp",
        "/home/autograde tmpfs",
        "/tmp tmpfs",
        "/var/tmp tmpfs",
        "/dev/shm tmpfs",
    ]


# --------------------------------------------------------------------------
# 5 and 6. a neighbour's processes: CPU fairness, per-uid limits, own uids


QUICK_PY = """\
import os, time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
r, w = os.pipe()
forked = 0
for _ in range(20):
    try:
        pid = os.fork()
    except OSError as e:
        print("fork:", e.strerror)
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # alive until the parent is done forking
        os._exit(0)
    forked += 1
os.close(w)
for _ in range(forked):
    os.wait()
print("forked", forked, "of 20; uid", os.getuid())
"""


async def test_a_busy_neighbour_takes_neither_cpu_nor_processes(dock: Dock) -> None:
    drv = Counting(url=dock.host, owner=dock.owner)  # nproc 100 for every job: per uid
    async with Manager(dock.settings(pool_size=2), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE, 2)
        hog = await mgr.submit(dock.job("hog", ["@python3 hog.py"], {"hog.py": HOG_PY},
                                        timeout=60))
        with anyio.fail_after(20):
            await drv.started.wait()
        assert hog.vm is not None
        hog_cid, hog_uid = hog.vm.driver_data["cid"], hog.vm.driver_data["uid"]
        busy = await wait_for_processes(hog_cid, "python3", 91, hog_uid)
        h = await mgr.submit(dock.job("quick", ["@python3 quick.py"], {"quick.py": QUICK_PY},
                                      timeout=20))
        r = await finish(h)
        # the neighbour still holds its 90 (none was lost to the quick job)
        still = await wait_for_processes(hog_cid, "python3", 91, hog_uid)
        await release(dock, hog)
        rh = await finish(hog)
    took = r.finished_at - r.submitted_at
    print(f"a 0.3 s CPU job next to 90 busy processes: {took:.2f}s")
    assert r.outcome is Outcome.SUCCESS and rh.outcome is Outcome.SUCCESS
    assert hog.vm is not None and h.vm is not None
    uid = h.vm.driver_data["uid"]
    assert len(busy) >= 91 and len(still) >= 91
    assert job_lines(h, "Autodriver: Job exited with status 0") == [
        f"forked 20 of 20; uid {uid}"
    ]
    assert uid != hog_uid
    assert took < 2, took
    assert body(hog)[1:] == ["holding 90"]


async def test_concurrent_containers_never_share_a_uid(dock: Dock) -> None:
    drv = Counting(2, url=dock.host, owner=dock.owner)
    async with Manager(dock.settings(pool_size=2), drivers={"docker": drv}) as mgr:
        await warm(mgr, IMAGE, 2)
        handles = [
            await mgr.submit(dock.job(f"who{i}", [
                "@id -u", "@id -un", "@id -g", "@stat -c %u:%g $$HOME .", HOLD,
            ], timeout=30))
            for i in range(2)
        ]
        # both run at once: each holds until released
        with anyio.fail_after(20):
            await drv.started.wait()
        for h in handles:
            assert h.vm is not None
            await wait_for_processes(h.vm.driver_data["cid"], "sleep", 1)
        running = claims_of(dock.owner)
        for h in handles:
            await release(dock, h)
        results = [await finish(h) for h in handles]
    uids = []
    for h, r in zip(handles, results, strict=True):
        assert r.outcome is Outcome.SUCCESS and h.vm is not None
        uid = h.vm.driver_data["uid"]
        assert job_lines(h, "Autodriver: Job exited with status 0") == [
            str(uid), "autograde", str(uid), f"{uid}:{uid}", f"{uid}:{uid}",
        ]
        assert running[uid] == f"docker:{dock.owner}/{h.vm.driver_data['cname']}"
        uids.append(uid)
    assert len(set(uids)) == 2
    for uid in uids:
        assert UID_BASE <= uid < UID_BASE + UID_COUNT
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)  # no host account
    # every container removed, every uid released
    assert claims_of(dock.owner) == {}


async def test_uid_claims_left_by_a_crashed_manager_are_released(dock: Dock) -> None:
    crashed = dock.driver()
    other = f"{dock.owner}-other"
    registry = UidRegistry(UID_BASE, UID_COUNT)
    # a claim with no container at all (a crash between claim and create),
    # and another manager's claim, which must be left alone
    ghost = registry.claim(f"docker:{dock.owner}/ghost")
    theirs = registry.claim(f"docker:{other}/theirs")
    try:
        for i in (1, 2):
            vm = TangoMachine(name=IMAGE, image=IMAGE, id=i)
            await crashed.initializeVM(vm)
        old = claims_of(dock.owner)
        assert len(old) == 3 and ghost in old
        await crashed.close()  # the crash: containers and claims stay

        drv = dock.driver()
        async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
            await warm(mgr, IMAGE)
            (vm,) = mgr.inventory()
            now = claims_of(dock.owner)
            assert now == {vm.driver_data["uid"]: f"docker:{dock.owner}/"
                           f"{vm.driver_data['cname']}"}
            assert registry.holds(theirs, f"docker:{other}/theirs")
        assert claims_of(dock.owner) == {}
    finally:
        registry.release(theirs, f"docker:{other}/theirs")
        registry.release(ghost, f"docker:{dock.owner}/ghost")
        await crashed.close()


# --------------------------------------------------------------------------
# 7. memory held in files (or a memfd) never costs the job its output

MEMFD_PY = """\
import os
fds = []
while True:
    fds.append(os.memfd_create("hog"))
    for _ in range(64):  # 64 MiB a memfd: below RLIMIT_FSIZE
        os.write(fds[-1], b"x" * (1 << 20))  # pages of a file, not of the process
"""


@pytest.mark.parametrize(
    ("hog", "files"),
    [
        ("@python3 bomb.py", {"bomb.py": MEMORY_BOMB_PY}),
        ("@python3 memfd.py", {"memfd.py": MEMFD_PY}),
    ],
    ids=["process-memory", "memfd"],
)
async def test_files_filling_memory_leave_the_autodriver_its_output(
    dock: Dock, hog: str, files: dict[str, str]
) -> None:
    memory = 256
    # the default quota (1 GiB) is above the memory: the files get their
    # share of half of it, and the job then fills the rest
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        h = await mgr.submit(dock.job("shm", [
            "@echo before the hog",
            FILL.replace("-lt 8", "-lt 64").replace("67108864", "4194304"),
            hog,
        ], files, timeout=30, memory=memory))
        r = await finish(h, 60)
    assert r.retries == 0 and r.failures == []
    assert r.outcome is Outcome.SUCCESS and r.exit_status == 0
    shares = file_quotas(memory * MIB, drv.disk_quota, drv.inode_quota)
    roles = (("home", "."), ("tmp", "/tmp"), ("var_tmp", "/var/tmp"), ("shm", "/dev/shm"))
    out = job_lines(
        h,
        "Autodriver: Job exited with status 2",
        f"Autodriver: memory limit of {memory * MIB} bytes exceeded",
        *(f"Autodriver: disk quota of {shares[role][0]} bytes exceeded" for role, _ in roles),
    )
    # the job's output from before the hog is all there
    assert out[:5] == [
        "before the hog",
        *(f"{d}: {whole_files(shares[role][0], 4 * MIB, d)}" for role, d in roles),
    ], out


SYSV_PY = """\
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
size = 60 << 20
shmid = libc.shmget(0, ctypes.c_size_t(size), 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
addr = libc.shmat(shmid, None, 0)
ctypes.memset(addr, 1, size)  # touched: charged to the container's memory
libc.shmdt(ctypes.c_void_p(addr))
# and never IPC_RMID: the segment would stay, with its memory, after we exit
"""


async def test_sysv_shared_memory_dies_with_the_jobs_processes(dock: Dock) -> None:
    # six segments of 60 MiB, one after the other, each left behind by its
    # process: kept, they would fill the 256 MiB and then the OOM killer
    # would take the autodriver
    drv = dock.driver()
    async with Manager(dock.settings(), drivers={"docker": drv}) as mgr:
        h = await mgr.submit(dock.job("sysv", [
            "@for i in 1 2 3 4 5 6; do python3 sysv.py || exit 1; done; echo 6 segments left",
            "@ipcs -m | grep -c 0x || true",
        ], {"sysv.py": SYSV_PY}, timeout=30, memory=256))
        r = await finish(h, 60)
    assert r.outcome is Outcome.SUCCESS and r.retries == 0
    assert job_lines(h, "Autodriver: Job exited with status 0") == ["6 segments left", "0"]
