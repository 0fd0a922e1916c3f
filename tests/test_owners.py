"""One owner per manager, and a liveness proof per owner (issue 9).

Two managers on one host, one state directory or one engine (a `vmpool
serve` and a `vmpool run` on the grading host, say) never touch each
other's VMs: each has an owner id of its own by default, its VM names carry
it, and a start-up reconciliation destroys only VMs whose manager is
provably gone (the local driver's owner lock is free; the Docker
container's maker process is dead). What a SIGKILLed manager left is
removed by the next start, whoever's.

Real parts: bubblewrap sandboxes as root, a real engine with the grading
image, real ``vmpool run`` subprocesses. Jobs that must be caught while
running tell the test so (local: the beacon socket; Docker: their process
in the container, as tests/test_docker_driver.py does), and run until the
test releases them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import pytest

from vmpool import JobHandle, Manager, Outcome, Settings
from vmpool_drivers.policy import UidRegistry

from .conftest import ROOT
from .jobs import driver_test_settings, finish, processes_of, read_lines, recipe_job, warm
from .test_docker_driver import IMAGE as DOCKER_IMAGE
from .test_docker_driver import EngineLeftovers, wait_for_process
from .test_local_driver import BEACON_PY, BEACON_ROOT, beacon

UID_BASE = 65000  # apart from the other modules' ranges
UIDS = 20
_slots = itertools.count()
PYTHON = str(ROOT / ".venv" / "bin" / "python")
LABEL_OWNER = "vmpool.owner"


def vmpool_run(jobdir: Path, out: Path, *extra: str) -> list[str]:
    """The command line of a real ``vmpool run`` of ``jobdir``."""
    return [PYTHON if Path(PYTHON).exists() else sys.executable, "-m", "vmpool.cli", "run",
            str(jobdir), "--output-dir", str(out), *extra]


async def run_cli(
    cmd: list[str], env: dict[str, str], limit: float = 180
) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(limit):
        return await anyio.run_process(cmd, env=env, cwd=ROOT, check=False,
                                       stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------
# local driver


class LocalEnv:
    """A state directory and uid range shared by every manager of one test."""

    def __init__(self, tmp: Path, slot: int) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.uid_base = UID_BASE + UIDS * slot
        self.uids = set(range(self.uid_base, self.uid_base + UIDS))
        self.owners: list[str] = []
        (tmp / "out").mkdir()

    def options(self) -> dict[str, Any]:
        return {"state_dir": str(self.state), "uid_base": self.uid_base, "uid_count": UIDS,
                "extra_ro_paths": [str(BEACON_ROOT)]}

    def settings(self, **kw: Any) -> Settings:
        """A manager's settings: NO owner given (each gets its default)."""
        return driver_test_settings("local", driver_options={"local": self.options()}, **kw)

    def manager(self, **kw: Any) -> Manager:
        mgr = Manager(self.settings(**kw))
        self.owners.append(mgr.owner)
        return mgr

    def holding_job(self, name: str, port: str) -> Any:
        """A job that reports ``name`` to the beacon and runs until released."""
        return recipe_job(self.tmp, name, "default",
                          [f"@python3 beacon.py {port} {name} hold", f"@echo {name}-done"],
                          {"beacon.py": BEACON_PY}, timeout=120, disable_network=False)

    def sandboxes(self) -> list[str]:
        if not self.state.is_dir():
            return []
        return sorted(str(p) for o in self.state.iterdir() if o.is_dir() for p in o.iterdir())

    def claims(self) -> list[str]:
        registry = Path("/run/vmpool/uids")
        return [str(registry / str(u)) for u in sorted(self.uids) if (registry / str(u)).exists()]

    def cgroups(self) -> list[str]:
        found: list[str] = []
        for ctrl in ("pids", "memory", ""):
            parent = Path("/sys/fs/cgroup") / ctrl / "vmpool"
            for owner in self.owners:
                if parent.is_dir():
                    found.extend(str(p) for p in parent.glob(f"vmpool-{owner}-*"))
        return found

    def leftovers(self) -> dict[str, list[str]]:
        left = {"sandboxes": self.sandboxes(), "uid claims": self.claims(),
                "cgroups": self.cgroups(), "processes": processes_of(self.uids)}
        return {k: v for k, v in left.items() if v}

    async def clean(self) -> None:
        from vmpool_drivers.local import LocalVMMS

        if self.state.is_dir():
            for o in self.state.iterdir():
                if o.is_dir():
                    drv = LocalVMMS(owner=o.name, state_dir=str(self.state),
                                    uid_base=self.uid_base, uid_count=UIDS)
                    for vm in await drv.getVMs():
                        with contextlib.suppress(Exception):
                            await drv.destroyVM(vm)
                    await drv.close()
        for claim in self.claims():
            shutil.rmtree(claim, ignore_errors=True)


@pytest.fixture
async def lenv(tmp_path: Path) -> AsyncIterator[LocalEnv]:
    env = LocalEnv(tmp_path, next(_slots))
    yield env
    left = env.leftovers()
    if left:
        await env.clean()
    assert left == {}, f"left behind: {left}"


async def test_two_local_managers_on_one_state_dir_never_touch_each_others_vms(
    lenv: LocalEnv,
) -> None:
    async with beacon() as b, lenv.manager() as a:
        await warm(a, "default")
        held = await a.submit(lenv.holding_job("a-held", b.port))
        await b.wait("a-held")
        assert held.vm is not None
        a_dir = Path(held.vm.driver_data["dir"])
        a_uid = held.vm.driver_data["uid"]
        a_vms = sorted(vm.instance_id or "" for vm in a.inventory())
        # a second manager on the same state directory, started while A's
        # job runs: it reconciles, makes VMs of the same pool and ids, runs
        async with lenv.manager() as other:
            await warm(other, "default", 1)
            h = await other.submit(recipe_job(lenv.tmp, "b", "default", ["@echo b-ran"],
                                              timeout=30))
            r = await finish(h)
            assert r.outcome is Outcome.SUCCESS, read_lines(h)
            assert h.vm is not None and h.vm.id == held.vm.id  # same id, other owner
            assert Path(h.vm.driver_data["dir"]) != a_dir
            assert h.vm.driver_data["uid"] != a_uid
            # A's job and VMs: untouched
            assert not held.done()
            assert a_dir.is_dir() and a_uid in {u for u, _ in UidRegistry(
                lenv.uid_base, UIDS).claims(f"{a.owner}/")}
            assert sorted(vm.instance_id or "" for vm in a.inventory()) == a_vms
            assert other.owner != a.owner
        assert not held.done()
        b.release("a-held")
        r = await finish(held)
        assert r.outcome is Outcome.SUCCESS, read_lines(held)
        assert "a-held-done" in read_lines(held)


async def test_vmpool_run_next_to_a_running_local_job(lenv: LocalEnv) -> None:
    """The issue's case: `vmpool run` on the host of a running server."""
    out = lenv.tmp / "run-out"
    env = {**os.environ, "VMPOOL_LOCAL_DIR": str(lenv.state)}
    async with beacon() as b, lenv.manager() as a:
        await warm(a, "default")
        held = await a.submit(lenv.holding_job("a-held", b.port))
        await b.wait("a-held")
        assert held.vm is not None
        a_dir = Path(held.vm.driver_data["dir"])
        done = await run_cli(vmpool_run(ROOT / "examples" / "hello", out), env)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert not held.done(), read_lines(held)
        assert a_dir.is_dir()
        assert held.vm.instance_id in {vm.instance_id for vm in a.inventory()}
        # the run left nothing of its own: its owner's directory and lock are gone
        assert sorted(p.name for p in lenv.state.iterdir()) == [a.owner, f"{a.owner}.lock"]
        b.release("a-held")
        r = await finish(held)
    assert r.outcome is Outcome.SUCCESS, read_lines(held)
    assert "a-held-done" in read_lines(held)
    (result,) = out.iterdir()
    assert "Success: Autodriver returned normally" in result.read_text()


CRASHING_MANAGER = """\
import json, sys
import anyio
from vmpool import Manager, Settings, make_job

async def main():
    settings = Settings(**json.loads(sys.argv[1]))
    async with Manager(settings, owner=sys.argv[2]) as mgr:
        pool = await mgr.ensure_pool(sys.argv[3])
        with anyio.fail_after(60):
            await pool.wait_until(lambda s: s.free >= 2)
        job = make_job(sys.argv[3], [(sys.argv[4], "Makefile")], sys.argv[5], timeout=300)
        h = await mgr.submit(job)
        with anyio.fail_after(60):
            await pool.wait_until(lambda s: s.busy >= 1)
        vms = [dict(vm.driver_data, id=vm.id) for vm in mgr.inventory()]
        print(json.dumps(vms, default=str), flush=True)
        await anyio.sleep_forever()  # ok-sleep: until the test kills this process

anyio.run(main)
"""


async def crashed_manager(tmp: Path, options: dict[str, Any], vmms: str, image: str,
                          owner: str) -> list[dict[str, Any]]:
    """Run a manager in a subprocess, kill it (SIGKILL) once it holds two VMs
    (one running a job): what it held, as it said."""
    makefile = tmp / "crash-job" / "Makefile"
    makefile.parent.mkdir()
    makefile.write_text("all:\n\t@sleep 300\n")
    settings = {"default_vmms": vmms, "pool_size": 2, "driver_options": {vmms: options},
                "initializevm_timeout": 60, "waitvm_timeout": 30}
    proc = await anyio.open_process(
        [sys.executable, "-c", CRASHING_MANAGER, json.dumps(settings), owner, image,
         str(makefile), str(tmp / "crash.out")],
        cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with anyio.fail_after(120):
            async for chunk in proc.stdout:
                line += chunk
                if line.endswith(b"\n"):
                    break
        held: list[dict[str, Any]] = json.loads(line)
        assert len(held) == 2, held
    finally:
        proc.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            await proc.wait()
        await proc.aclose()
    return held


async def test_a_killed_local_managers_sandboxes_are_removed_by_the_next_start(
    lenv: LocalEnv,
) -> None:
    owner = f"crashed-{os.getpid()}"
    lenv.owners.append(owner)
    held = await crashed_manager(lenv.tmp, lenv.options(), "local", "default", owner)
    dirs = [Path(vm["dir"]) for vm in held]
    uids = {int(vm["uid"]) for vm in held}
    assert all(d.is_dir() and d.parent.name == owner for d in dirs)
    assert lenv.claims() != [] and lenv.cgroups() != []
    # the next start, another owner's: what the dead one left is gone before
    # any pool of this run exists
    async with lenv.manager() as mgr:
        await mgr.driver("local")
        assert mgr.pools == {}
        assert [d for d in dirs if d.exists()] == []
        assert lenv.claims() == [] and processes_of(uids) == []
        assert lenv.cgroups() == []
        assert not (lenv.state / owner).exists() and not (lenv.state / f"{owner}.lock").exists()
        h = await mgr.submit(recipe_job(lenv.tmp, "after", "default", ["@echo after"],
                                        timeout=30))
        assert (await finish(h)).outcome is Outcome.SUCCESS


# --------------------------------------------------------------------------
# Docker driver


class DockerEnv(EngineLeftovers):
    def __init__(self, host: str, tmp: Path) -> None:
        self.host = host
        self.tmp = tmp
        self.owners: list[str] = []
        (tmp / "out").mkdir()

    def settings(self, **kw: Any) -> Settings:
        return driver_test_settings("docker", driver_options={"docker": {"url": self.host}},
                                    **kw)

    def manager(self, **kw: Any) -> Manager:
        mgr = Manager(self.settings(**kw))
        self.owners.append(mgr.owner)
        return mgr

    async def containers(self, owner: str) -> list[dict[str, Any]]:
        async with aiodocker.Docker(url=self.host) as docker:
            found = await docker.containers.list(
                all=True, filters={"label": [f"{LABEL_OWNER}={owner}"]})
            return [c._container for c in found]

    async def exec_in(self, cid: str, cmd: list[str]) -> None:
        async with aiodocker.Docker(url=self.host) as docker:
            exe = await docker.containers.container(cid).exec(cmd, stdout=True, stderr=True)
            async with exe.start(detach=False) as stream:
                while await stream.read_out() is not None:
                    pass

    def holding_job(self, name: str) -> Any:
        """A job whose process ``holder`` runs until /tmp/release exists."""
        return recipe_job(
            self.tmp, name, DOCKER_IMAGE, ["@chmod +x holder && ./holder"],
            {"holder": "#!/bin/sh\necho holding\n"
                       "while [ ! -e /tmp/release ]; do sleep 0.05; done\n"  # ok-sleep: in the job
                       "echo released\n"},
            timeout=120,
        )


@pytest.fixture
async def denv(docker_host: str, tmp_path: Path) -> AsyncIterator[DockerEnv]:
    env = DockerEnv(docker_host, tmp_path)
    yield env
    left = await env.leftovers()
    if left:
        await env.clean()
    assert left == {}, f"containers left behind: {left}"


async def start_held(env: DockerEnv, mgr: Manager) -> tuple[JobHandle, str]:
    await warm(mgr, DOCKER_IMAGE)
    held = await mgr.submit(env.holding_job("a-held"))
    with anyio.fail_after(30):
        await mgr.pools[next(iter(mgr.pools))].wait_until(lambda s: s.busy >= 1)
    assert held.vm is not None
    cid = held.vm.driver_data["cid"]
    await wait_for_process(cid, "holder", limit=30)
    return held, cid


async def test_two_docker_managers_on_one_engine_never_touch_each_others_vms(
    denv: DockerEnv,
) -> None:
    async with denv.manager() as a:
        held, cid = await start_held(denv, a)
        a_ids = {c["Id"] for c in await denv.containers(a.owner)}
        async with denv.manager() as other:
            await warm(other, DOCKER_IMAGE)
            h = await other.submit(recipe_job(denv.tmp, "b", DOCKER_IMAGE, ["@echo b-ran"],
                                              timeout=30))
            r = await finish(h)
            assert r.outcome is Outcome.SUCCESS, read_lines(h)
            assert h.vm is not None and h.vm.id == held.vm.id  # type: ignore[union-attr]
            assert not held.done()
            assert {c["Id"] for c in await denv.containers(a.owner)} >= a_ids
            assert other.owner != a.owner
        assert not held.done()
        await denv.exec_in(cid, ["touch", "/tmp/release"])
        r = await finish(held)
        assert r.outcome is Outcome.SUCCESS, read_lines(held)
        assert "released" in read_lines(held)


async def test_vmpool_run_next_to_a_running_docker_job(denv: DockerEnv) -> None:
    out = denv.tmp / "run-out"
    env = {**os.environ, "DOCKER_HOST": denv.host}
    async with denv.manager() as a:
        held, cid = await start_held(denv, a)
        a_ids = {c["Id"] for c in await denv.containers(a.owner)}
        done = await run_cli(
            vmpool_run(ROOT / "examples" / "hello", out, "--driver", "docker",
                       "--image", DOCKER_IMAGE), env)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert not held.done(), read_lines(held)
        assert {c["Id"] for c in await denv.containers(a.owner)} >= a_ids
        await denv.exec_in(cid, ["touch", "/tmp/release"])
        r = await finish(held)
    assert r.outcome is Outcome.SUCCESS, read_lines(held)
    (result,) = out.iterdir()
    assert "Success: Autodriver returned normally" in result.read_text()


async def test_a_killed_docker_managers_containers_are_removed_by_the_next_start(
    denv: DockerEnv,
) -> None:
    owner = f"crashed-{os.getpid()}"
    denv.owners.append(owner)
    held = await crashed_manager(denv.tmp, {"url": denv.host}, "docker", DOCKER_IMAGE, owner)
    cids = {vm["cid"] for vm in held}
    assert cids <= {c["Id"] for c in await denv.containers(owner)}
    uids = {int(vm["uid"]) for vm in held}
    async with denv.manager() as mgr:
        await mgr.driver("docker")
        assert mgr.pools == {}
        assert await denv.containers(owner) == []
        registry = UidRegistry(61000, 2000)
        assert [u for u in uids if (registry.holder(u) or "").startswith(f"docker:{owner}/")] == []


# --------------------------------------------------------------------------
# the server's owner: the same across restarts


async def test_the_server_keeps_its_owner_beside_its_database(tmp_path: Path) -> None:
    from vmpool.server.app import running, server_owner
    from vmpool.server.config import ServerConfig

    def config(db: str) -> ServerConfig:
        return ServerConfig(database=str(tmp_path / db), courselabs=str(tmp_path / "labs"))

    first = server_owner(config("jobs.sqlite"))
    assert first is not None and first == server_owner(config("jobs.sqlite"))
    kept = tmp_path / "jobs.sqlite.owner"
    assert kept.read_text() == f"{first}\n" and kept.stat().st_mode & 0o777 == 0o600
    assert server_owner(config("other.sqlite")) not in (None, first)
    async with running(config("jobs.sqlite")) as server:
        assert server.manager.owner == first  # what its drivers label VMs with
    async with running(config("jobs.sqlite")) as server:
        assert server.manager.owner == first
