"""The local driver's sandbox walls, each tried by the attack it stops.

Real bubblewrap, real cgroups, real pasta, a real ``vmpool serve`` where the
server's own paths matter. Where a wall has a switch (seccomp, the quota,
the network mode), the test also runs the attack with the wall switched off
and asserts it then succeeds: the test would fail without the wall.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.streams.text
import pytest

from vmpool import DestroyVMError, Manager, Outcome, TangoJob, TangoMachine
from vmpool_drivers.local import LocalVMMS
from vmpool_drivers.local import driver as local_driver
from vmpool_drivers.local.sandbox import _CAP_NUMBERS as _CAPS
from vmpool_drivers.policy import AUTODRIVER_CAPS, UidRegistry, pids_of_uid

from .jobs import (
    HOG_PY,
    driver_test_settings,
    finish,
    processes_of,
    read_lines,
    recipe_job,
    warm,
)
from .test_local_driver import Local

UID_BASE = 64000
UIDS = 20  # per test
IMAGE = "default"
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
_slots = itertools.count()


class Env(Local):
    """One test's owner, state directory and uids (this module's range), and
    a job factory."""

    def __init__(self, tmp: Path, slot: int) -> None:
        super().__init__(tmp, slot, tag="tsb", uid_base=UID_BASE, uids=UIDS)
        self._n = 0

    def driver(self, **kw: Any) -> LocalVMMS:  # type: ignore[override]
        kw.setdefault("state_dir", str(self.state))
        kw.setdefault("uid_count", UIDS)
        return LocalVMMS(owner=self.owner, uid_base=self.uid_base, **kw)

    def job(self, recipe: list[str], files: dict[str, str] | None = None,  # type: ignore[override]
            **kw: Any) -> TangoJob:
        self._n += 1
        kw.setdefault("timeout", 60)
        return recipe_job(self.tmp, kw.pop("name", f"job{self._n}"), IMAGE, recipe, files, **kw)

    def leftovers(self) -> dict[str, list[str]]:
        owner_dir = self.state / self.owner
        left = {
            "processes": processes_of(self.uids),
            "uid claims": [str(u) for u in self.uids if Path(f"/run/vmpool/uids/{u}").exists()],
            "sandboxes": [str(p) for p in owner_dir.iterdir()] if owner_dir.is_dir() else [],
        }
        return {k: v for k, v in left.items() if v}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, next(_slots))
    yield e
    assert e.leftovers() == {}, "left behind"


async def run_one(env: Env, job: TangoJob, limit: float = 120, **drv: Any) -> list[str]:
    """Run ``job`` on a fresh local driver; the autodriver's lines (after Tango's header)."""
    async with Manager(driver_test_settings("local"),
                       drivers={"local": env.driver(**drv)}) as mgr:
        h = await mgr.submit(job)
        r = await finish(h, limit)
    lines = read_lines(h)
    assert r.outcome in (Outcome.SUCCESS, Outcome.TIMEOUT), lines
    return lines[lines.index("---") + 1:]


# --------------------------------------------------------------------------
# 1 and 2. environment and files, under a real `vmpool serve`


LOOK_PY = """\
import os, sys
print("env", " ".join(sorted(os.environ)))
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            print("dir", path, sorted(os.listdir(path)))
        else:
            with open(path, "rb") as f:
                data = f.read(4096)
            print("file", path, len(data), data[:16])
    except OSError as e:
        print("none", path, e.strerror)
"""


@contextlib.contextmanager
def private_dirs() -> Iterator[tuple[Path, Path]]:
    """Directories under /opt and /etc, which sandboxes show read-only: a
    server's files there are found by path unless the sandbox covers them."""
    tag = f"vmpool-test-{os.getpid()}"
    opt, etc = Path("/opt") / tag, Path("/etc") / tag
    for d in (opt, etc):
        d.mkdir(mode=0o755)
    try:
        yield opt, etc
    finally:
        for d in (opt, etc):
            shutil.rmtree(d, ignore_errors=True)


async def test_a_job_sees_nothing_of_the_server(env: Env) -> None:
    """A job under `vmpool serve` sees none of the server's environment
    (its key, cloud credentials) and none of its files by their real paths:
    courselabs, job database, config file, state, uid claims, /root."""
    with private_dirs() as (opt, etc):
        courselabs, database, config = opt / "courselabs", opt / "jobs.sqlite", etc / "vmpool.toml"
        config.write_text(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\nkeys = [\"s3cret-key\"]\n"
            f"courselabs = \"{courselabs}\"\ndatabase = \"{database}\"\n"
            "[vmpool]\npool_size = 1\ndefault_vmms = \"local\"\n"
            f"[drivers.local]\nstate_dir = \"{env.state}\"\nowner = \"{env.owner}\"\n"
            f"uid_base = {env.uid_base}\nuid_count = {UIDS}\n"
        )
        os.chmod(config, 0o644)  # even if the course staff leave it readable
        server_env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "aws-s3cret",
                      "VMPOOL_SECRET_TOKEN": "tok-s3cret"}
        proc = await anyio.open_process(
            [sys.executable, "-m", "vmpool.cli", "serve", "--config", str(config)],
            env=server_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        log: list[str] = []
        try:
            port = await _server_port(proc, log)
            paths = [str(courselabs), str(database), f"{database}-wal", str(config),
                     str(env.state), "/run/vmpool/uids", "/root", "/var/lib/vmpool",
                     str(courselabs / "s3cret-key-lab")]
            out = await _grade_over_http(port, "s3cret-key", LOOK_PY, paths)
        finally:
            proc.terminate()
            with anyio.fail_after(30):
                await proc.wait()
            await proc.aclose()
        # the server's files are owner-only
        assert courselabs.stat().st_mode & 0o777 == 0o700, log
        assert database.stat().st_mode & 0o777 == 0o600
        assert (courselabs / "s3cret-key-lab").stat().st_mode & 0o777 == 0o700
    text = "\n".join(out)
    (names,) = [line for line in out if line.startswith("env ")]
    assert set(names.split()[1:]) <= {"HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "PWD",
                                      "TERM", "USER", "MAKEFLAGS", "MAKELEVEL", "MFLAGS",
                                      "SHLVL", "_", "OLDPWD"}, names
    for secret in ("aws-s3cret", "tok-s3cret", "SQLite format", "keys =", "courselabs ="):
        assert secret not in text, out
    seen = {line.split()[1]: line for line in out if line.split()[0] in ("dir", "file", "none")}
    for path in (str(courselabs), str(env.state), "/var/lib/vmpool", "/run/vmpool/uids",
                 "/root"):
        assert seen[path].startswith(("none ", f"dir {path} []")), seen[path]
    for path in (str(database), str(config)):
        assert seen[path].startswith(("none ", f"file {path} 0 ")), seen[path]


async def _server_port(proc: anyio.abc.Process, log: list[str]) -> int:
    assert proc.stdout is not None
    with anyio.fail_after(60):
        async for line in anyio.streams.text.TextReceiveStream(proc.stdout):
            log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", "".join(log))
            if m:
                return int(m.group(1))
    raise AssertionError(f"vmpool serve exited before listening: {''.join(log)}")


async def _grade_over_http(port: int, key: str, look_py: str, paths: list[str]) -> list[str]:
    base = f"http://127.0.0.1:{port}"
    makefile = "all:\n\t@python3 look.py " + " ".join(paths) + "\n"
    async with aiohttp.ClientSession() as http:
        async def call(path: str, **kw: Any) -> Any:
            method = http.post if "data" in kw else http.get
            async with method(base + path, **kw) as r:
                return json.loads(await r.read())

        assert (await call(f"/open/{key}/lab/"))["statusId"] == 0
        for name, body in (("Makefile", makefile), ("look.py", look_py)):
            r = await call(f"/upload/{key}/lab/", data=body.encode(), headers={"Filename": name})
            assert r["statusId"] == 0, r
        job = {"image": IMAGE, "files": [{"localFile": "Makefile", "destFile": "Makefile"},
                                         {"localFile": "look.py", "destFile": "look.py"}],
               "jobName": "look", "output_file": "look.out", "timeout": 30}
        r = await call(f"/addJob/{key}/lab/", data=json.dumps(job))
        assert r["statusId"] == 0, r
        with anyio.fail_after(90):
            while True:
                async with http.get(f"{base}/poll/{key}/lab/look.out/") as resp:
                    body = await resp.read()
                    if resp.content_type != "application/json":
                        text = body.decode(errors="replace").splitlines()
                        return text[text.index("---") + 1:]
                await anyio.sleep(0.1)  # ok-sleep: polling as Autolab does; bounded


# --------------------------------------------------------------------------
# 4. no new kernel attack surface


KERNEL_PY = """\
import ctypes, errno, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    r = libc.syscall(nr, *args)
    print(name, "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?"))
# keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, create=1)
# system call numbers: (keyctl, add_key, open_by_handle_at) per architecture
nr = {"x86_64": (250, 248, 304), "aarch64": (219, 217, 265)}[os.uname().machine]
call("keyctl", nr[0], 0, -3, 1)
call("add_key", nr[1], b"user", b"vmpool-test", b"x", 1, -3)
call("open_by_handle_at", nr[2], -100, 0, 0)
u = subprocess.run(["unshare", "-U", "true"], capture_output=True)
print("unshare", "ok" if u.returncode == 0 else "refused")
def status(pid):
    return dict(l.split(":\\t", 1) for l in open("/proc/%s/status" % pid).read().splitlines()
                if ":\\t" in l)
me = status("self")
# the autodriver: the first ancestor running as root
pid = os.getppid()
while status(pid)["Uid"].split()[0] != "0":
    pid = status(pid)["PPid"].strip()
print("nnp", me["NoNewPrivs"].strip(), "capeff", me["CapEff"].strip())
print("autodriver caps", status(pid)["CapEff"].strip())
"""


@pytest.mark.parametrize("sandbox", ["bwrap", "rlimits"])
async def test_no_user_namespaces_keyring_or_file_handles(env: Env, sandbox: str) -> None:
    kw: dict[str, Any] = {"sandbox": sandbox}
    if sandbox == "rlimits":
        kw["state_dir"] = f"/var/lib/vmpool-test-state-{os.getpid()}"
    try:
        walled = await run_one(env, env.job(["@python3 kernel.py"], {"kernel.py": KERNEL_PY}),
                               **kw)
        open_ = await run_one(env, env.job(["@python3 kernel.py"], {"kernel.py": KERNEL_PY}),
                              seccomp=False, **kw)
    finally:
        if sandbox == "rlimits":
            shutil.rmtree(kw["state_dir"], ignore_errors=True)
    assert walled[1:6] == [
        "keyctl EPERM", "add_key EPERM", "open_by_handle_at EPERM", "unshare refused",
        "nnp 1 capeff 0000000000000000",
    ], walled
    if sandbox == "bwrap":
        # the autodriver holds the policy's capabilities at most: never
        # DAC_READ_SEARCH (open_by_handle_at), never SYS_ADMIN & co.
        allowed = sum(1 << n for c, n in _CAPS.items() if c[4:] in AUTODRIVER_CAPS)
        caps = int(walled[6].split()[-1], 16)
        assert caps and caps & ~allowed == 0 and not caps & 1 << 2, walled[6]
    # the same calls without the filter: the test sees the wall, not an accident
    assert open_[1] == "keyctl ok" and open_[2] == "add_key ok", open_
    assert open_[4] == "unshare ok", open_
    assert open_[5].startswith("nnp 1 "), open_  # no_new_privs is there anyway


# --------------------------------------------------------------------------
# 5. quotas


FILL_PY = """\
block = b"x" * (1 << 20)
for i in range(21):
    try:
        with open("big%d" % i, "wb") as f:
            for _ in range(99):
                f.write(block)
    except OSError as e:
        print("stopped in file %d: %s" % (i, e.strerror))
        break
"""
FILES_PY = """\
for i in range(200000):
    try:
        open("f%d" % i, "w").close()
    except OSError as e:
        print("stopped at", i, e.strerror)
        break
"""


def host_usage(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree


async def test_disk_and_inode_quotas(env: Env) -> None:
    env.state.mkdir()
    before = host_usage(env.state)
    # 21 files of 99 MiB: each under the per-file limit, 2 GiB in all
    big = await run_one(env, env.job(["@python3 fill.py"], {"fill.py": FILL_PY}))
    many = await run_one(env, env.job(["@python3 files.py"], {"files.py": FILES_PY}))
    after = host_usage(env.state)
    assert big[1] == f"Autodriver: disk quota of {1 << 30} bytes exceeded", big
    m = re.search(r"stopped in file (\d+): No space left on device", "\n".join(big))
    assert m and int(m.group(1)) == 10, big  # 1 GiB = 10 files and a bit
    assert many[1] == "Autodriver: inode quota of 100000 files exceeded", many
    m = re.search(r"stopped at (\d+) No space left on device", "\n".join(many))
    assert m and 99_000 < int(m.group(1)) < 100_000, many
    # nothing of it reached the host's disk
    assert after[0] - before[0] < 64 * MIB and after[1] - before[1] < 1000, (before, after)
    # with the quota switched off, the same file lands on the host's disk
    # (a small one: the point is where it goes, not how big it gets)
    plain = env.driver(disk_quota=0)
    vm = TangoMachine(name=IMAGE, image=IMAGE, id=99)
    await plain.initializeVM(vm)
    try:
        assert Path(vm.driver_data["job"]).stat().st_dev == env.state.stat().st_dev
    finally:
        await plain.destroyVM(vm)


# --------------------------------------------------------------------------
# 6. CPU fairness


SHORT_PY = """\
import time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("done")
"""


async def test_a_fork_heavy_neighbour_does_not_slow_a_short_job(env: Env) -> None:
    drv = env.driver()
    async with Manager(driver_test_settings("local", pool_size=2),
                       drivers={"local": drv}) as mgr:
        hog = await mgr.submit(env.job(["@python3 hog.py"], {"hog.py": HOG_PY}, timeout=60))
        with anyio.fail_after(30):
            # ok-sleep: until the hog's 90 processes run; bounded
            while hog.vm is None or not Path(hog.vm.driver_data["job"], "hogging").exists():  # noqa: ASYNC110
                await anyio.sleep(0.02)
        short = await mgr.submit(env.job(["@python3 short.py"], {"short.py": SHORT_PY},
                                         timeout=30))
        started = time.monotonic()
        r = await finish(short, 60)
        took = time.monotonic() - started
        hog.cancel()
        await finish(hog)
    assert r.outcome is Outcome.SUCCESS and "done" in read_lines(short)
    assert took < 2.0, f"a 0.3 s job took {took:.2f} s next to 90 busy processes"


# --------------------------------------------------------------------------
# 7. memory held in tmpfs is the job's, and its output is kept


async def test_a_tmpfs_memory_hog_is_a_memory_kill_with_its_output(env: Env) -> None:
    lines = await run_one(env, env.job(
        ["@echo before the hog",
         "@for i in 1 2 3 4 5 6 7 8; do dd if=/dev/zero of=/dev/shm/hog$$i bs=1M count=64 "
         "2>/dev/null || exit 1; done", "@echo not reached"], timeout=60), memory_mb=256)
    assert lines[0] == "Autodriver: Job exited with status 2", lines
    assert f"Autodriver: memory limit of {256 * MIB} bytes exceeded" in lines, lines
    assert "before the hog" in lines and "not reached" not in lines


# --------------------------------------------------------------------------
# 9. cleanup that cannot be defeated


DEEP_PY = """\
import os
for i in range(3000):
    os.mkdir("d")
    os.chdir("d")
open("bottom", "w").close()
print("deep", i + 1)
"""


@pytest.mark.parametrize("quota", [True, False], ids=["on-tmpfs", "on-disk"])
async def test_a_3000_level_tree_is_removed_and_its_uid_reused(env: Env, quota: bool) -> None:
    # one uid: the second job gets it only if it was freed
    drv = env.driver(uid_count=1, **({} if quota else {"disk_quota": 0}))
    async with Manager(driver_test_settings("local"), drivers={"local": drv}) as mgr:
        h1 = await mgr.submit(env.job(["@python3 deep.py"], {"deep.py": DEEP_PY}))
        r1 = await finish(h1, 60)
        # the refill gets a VM once the first one's removal gave its uid back
        # (until then its creations fail: every uid is in use)
        await warm(mgr, IMAGE, 1)
        h2 = await mgr.submit(env.job(["@id -u"]))
        r2 = await finish(h2, 60)
    assert r1.outcome is r2.outcome is Outcome.SUCCESS
    assert "deep 3000" in read_lines(h1)
    assert str(env.uid_base) in read_lines(h2)
    assert h1.vm is not None and not Path(h1.vm.driver_data["dir"]).exists()


async def test_a_uid_with_a_live_process_is_not_released(env: Env,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A process of the VM's uid that survives the kill (here: the kill is
    switched off) keeps the VM leaked and its uid claimed, never handed on."""
    drv = env.driver()
    vm = TangoMachine(name=IMAGE, image=IMAGE, id=1)
    await drv.initializeVM(vm)
    uid = vm.driver_data["uid"]
    survivor = await anyio.open_process(["sleep", "300"], user=uid, group=uid)
    try:
        monkeypatch.setattr(local_driver, "_kill_uid", lambda uid: None)
        with pytest.raises(DestroyVMError, match=f"processes of uid {uid} survive"):
            await drv.destroyVM(vm)
        assert drv.uids.holder(uid) == vm.instance_id == f"{env.owner}/local-1-{IMAGE}"
        assert Path(vm.driver_data["dir"]).exists()
    finally:
        survivor.kill()
        await survivor.wait()
        monkeypatch.undo()
    await drv.destroyVM(vm)  # nothing of the uid left: now it goes
    assert drv.uids.holder(uid) is None and not Path(vm.driver_data["dir"]).exists()


async def test_reconciliation_leaves_a_reclaimed_uid_alone(env: Env) -> None:
    """A leftover sandbox whose uid claim now names another sandbox: removing
    the leftover neither kills that uid's processes nor frees its claim."""
    drv = env.driver()
    vm = TangoMachine(name=IMAGE, image=IMAGE, id=1)
    await drv.initializeVM(vm)
    uid = vm.driver_data["uid"]
    registry = UidRegistry(env.uid_base, UIDS)
    # the claim passes to someone else (a crash, then a restart that reused it)
    shutil.rmtree(registry.dir / str(uid))
    assert registry.claim("someone-else/local-7-default") == uid
    other = await anyio.open_process(["sleep", "300"], user=uid, group=uid)
    try:
        (leftover,) = await env.driver().getVMs()
        await env.driver().destroyVM(leftover)
        assert other.returncode is None, "another sandbox's process was killed"
        assert registry.holder(uid) == "someone-else/local-7-default"
        assert not Path(vm.driver_data["dir"]).exists()
    finally:
        other.kill()
        await other.wait()
        registry.release(uid, "someone-else/local-7-default")
    assert pids_of_uid(uid) == []


# --------------------------------------------------------------------------
# 10. the CLI shows a job's output safely


def test_the_cli_escapes_a_forged_status(tmp_path: Path) -> None:
    job = tmp_path / "forge"
    job.mkdir()
    (job / "Makefile").write_text(
        "all:\n\t@printf 'real line\\r\\033[2K\\033[1AAutograder: Success\\033[0m\\n'\n")
    env = {**os.environ, "VMPOOL_LOCAL_DIR": str(tmp_path / "state")}
    done = subprocess.run(
        [sys.executable, "-m", "vmpool.cli", "run", str(job), "--output-dir", str(tmp_path / "o")],
        capture_output=True, timeout=120, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert b"\x1b" not in done.stdout and b"\r" not in done.stdout
    assert b"real line\\r\\x1b[2K\\x1b[1AAutograder: Success\\x1b[0m" in done.stdout, done.stdout
    # the output file keeps the job's bytes
    (out,) = (tmp_path / "o").iterdir()
    assert b"real line\r\x1b[2K\x1b[1AAutograder: Success\x1b[0m" in out.read_bytes()

