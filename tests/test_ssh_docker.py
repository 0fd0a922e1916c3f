"""The SSH Docker driver over real sshd "hosts" (tests/sshd.py): placement,
a host that dies mid-run and comes back, bad keys and refused connections,
drain. Its VMMS rules are in tests/test_contract_ssh_docker.py."""

from __future__ import annotations

import contextlib
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import pytest

from vmpool import Manager, Outcome, make_job
from vmpool_drivers.ssh_docker import SSHDockerVMMS

from .conftest import GRADER_IMAGE
from .jobs import driver_test_settings
from .sshd import SSHHosts, free_port, keygen

UID_BASE = 69000
UIDS = 200


def driver(hosts: SSHHosts, rooms: list[int] | None = None, **kw: Any) -> SSHDockerVMMS:
    specs = [hosts.spec(h, **({"max_vms": rooms[i]} if rooms else {}))
             for i, h in enumerate(hosts.hosts)]
    return SSHDockerVMMS(owner=f"ssh-{uuid.uuid4().hex[:8]}", hosts=specs, uid_base=UID_BASE,
                         uid_count=UIDS, connect_timeout=5, backoff_initial=0.2,
                         backoff_max=1.0, **kw)


@contextlib.asynccontextmanager
async def manager(drv: SSHDockerVMMS, **settings: Any) -> AsyncIterator[Manager]:
    async with Manager(driver_test_settings("ssh_docker", **settings),
                       drivers={"ssh_docker": drv}) as mgr:
        yield mgr


def busy_on(mgr: Manager, busy: list[int], host: str) -> bool:
    """Whether one of the ``busy`` VMs (a pool's busy_ids) lives on ``host``."""
    return any(vm.id in busy and vm.domain_name == host for vm in mgr.inventory())


def spread(mgr: Manager) -> dict[str, int]:
    return dict(Counter(vm.domain_name for vm in mgr.inventory() if vm.domain_name))


async def containers_of(docker_host: str, owner: str, host: str | None = None) -> list[str]:
    labels = [f"vmpool.owner={owner}", *([f"vmpool.host={host}"] if host else [])]
    async with aiodocker.Docker(url=docker_host) as docker:
        found = await docker.containers.list(all=True, filters={"label": labels})
    return [c.id for c in found]


@pytest.mark.parametrize(("rooms", "want"), [([4, 4, 4], [4, 4, 4]), ([8, 4, 0], [8, 4, 0])])
async def test_placement_follows_free_room(ssh_hosts: SSHHosts, rooms: list[int],
                                           want: list[int]) -> None:
    drv = driver(ssh_hosts, rooms)
    async with manager(drv, pool_size=12) as mgr:
        pool = await mgr.ensure_pool(GRADER_IMAGE)
        with anyio.fail_after(120):
            await pool.wait_until(lambda s: s.free == 12)
        got = spread(mgr)
        assert [got.get(h.name, 0) for h in ssh_hosts.hosts] == want
        # where each VM lives is in its labels too: a restart finds it
        listed = Counter(vm.domain_name for vm in await drv.getVMs())
        assert [listed.get(h.name, 0) for h in ssh_hosts.hosts] == want


async def test_an_exclusive_pool_puts_one_vm_per_host(ssh_hosts: SSHHosts) -> None:
    drv = driver(ssh_hosts, exclusive=["vmpool/grader:latest"])
    async with manager(drv, pool_size=3, pool_max_size=4) as mgr:
        pool = await mgr.ensure_pool(GRADER_IMAGE)
        with anyio.fail_after(120):
            await pool.wait_until(lambda s: s.free == 3)
        assert sorted(spread(mgr).values()) == [1, 1, 1]
        pool.resize(4)  # a fourth has no host to go to
        with anyio.fail_after(60):
            st = await pool.wait_until(lambda s: s.failed >= 1)
        assert "no host can take the VM" in (st.last_error or "")
        assert sorted(spread(mgr).values()) == [1, 1, 1]


def _job(tmp: Path, i: int, seconds: float) -> Any:
    d = tmp / f"j{i}"
    d.mkdir()
    (d / "Makefile").write_text(f"all:\n\t@echo job {i}; sleep {seconds:g}; echo done {i}\n")
    (tmp / "out").mkdir(exist_ok=True)
    return make_job(GRADER_IMAGE, [(str(d / "Makefile"), "Makefile")],
                    str(tmp / "out" / f"{i}.out"), name=f"j{i}", timeout=60)


async def test_a_host_that_dies_mid_run_costs_a_retry(
        ssh_hosts: SSHHosts, docker_host: str, tmp_path: Path) -> None:
    """60 jobs on 3 hosts, one sshd killed (with its connections) while jobs
    run there: every job ends once, complete; those that ran there were
    retried elsewhere and say so; the pool refills on the other two; once
    sshd is back the host takes VMs again and its leftovers are gone."""
    drv = driver(ssh_hosts, [2, 2, 2])
    victim = ssh_hosts.hosts[1]
    try:
        async with manager(drv, pool_size=6, job_retries=2) as mgr:
            pool = await mgr.ensure_pool(GRADER_IMAGE)
            with anyio.fail_after(120):
                await pool.wait_until(lambda s: s.free == 6)
            handles = [await mgr.submit(_job(tmp_path, i, 0.5)) for i in range(60)]

            with anyio.fail_after(120):
                await pool.wait_until(lambda s: busy_on(mgr, s.busy_ids, victim.name))
            killed = time.monotonic()
            victim.kill()
            with anyio.fail_after(30):  # back at its target on the two others
                await pool.wait_until(
                    lambda s: s.free + s.busy >= 4 and drv.hosts()[victim.name]["state"] == "down")
            print(f"pool back at 4 VMs on the other two hosts {time.monotonic() - killed:.2f} s "
                  "after the kill")
            with anyio.fail_after(300):
                await mgr.join()
            results = [h.result for h in handles]
            assert all(r is not None for r in results)
            bad = [Path(h.job.outputFile).read_text() for h in handles
                   if h.result is None or h.result.outcome is not Outcome.SUCCESS]
            assert not bad, bad[0]
            for h in handles:
                text = Path(h.job.outputFile).read_text()
                assert text.count(f"done {h.job.name[1:]}") == 1, text
            # each job says where it ran last (Tango's job.vm, as /jobs shows it)
            assert {h.job.vm.domain_name for h in handles} <= {h.name for h in ssh_hosts.hosts}
            retried = [Path(h.job.outputFile).read_text() for h in handles
                       if "Try 1 failed" in Path(h.job.outputFile).read_text()]
            assert retried, "no job was running on the host that died"
            for text in retried:
                assert f"Try 1 failed: Internal error: runJob failed: host {victim.name} " \
                       "unreachable" in text, text
            # back: the host is used again, and what was left there is gone
            left_before = await containers_of(docker_host, drv.owner, victim.name)
            victim.start()
            pool.resize(6)
            with anyio.fail_after(60):
                # warm again on all three (the host's return ends the pool's
                # wait for room: no timer to wait out), nothing being made
                await pool.wait_until(lambda s: s.free == 6 and s.creating == 0)
            assert drv.hosts()[victim.name]["state"] == "up"
            assert spread(mgr) == {h.name: 2 for h in ssh_hosts.hosts}
            live = {vm.instance_id for vm in mgr.inventory() if vm.domain_name == victim.name}
            now = set(await containers_of(docker_host, drv.owner, victim.name))
            # what the dead host kept (its VMs were forgotten, not destroyed)
            # is removed once it answers again; what is there now is live
            assert left_before, "the dead host kept no container (the engine is shared)"
            assert not set(left_before) & now, f"leftovers on {victim.name}"
            assert now <= live, f"unknown containers on {victim.name}: {now - live}"
            # and the other hosts' containers (on the same engine) were left alone
            for other in ssh_hosts.hosts:
                if other is not victim:
                    theirs = {vm.instance_id for vm in mgr.inventory()
                              if vm.domain_name == other.name}
                    on_engine = set(await containers_of(docker_host, drv.owner, other.name))
                    assert theirs and theirs <= on_engine, other.name
    finally:
        if victim.proc is None:
            victim.start()


async def test_bad_keys_and_refused_connections_name_the_host(
        ssh_hosts: SSHHosts, tmp_path: Path) -> None:
    """An unknown host key, a wrong client key and a refused port: one clear
    error each, naming the host; the good hosts keep working."""
    good = ssh_hosts.spec(ssh_hosts.hosts[0], name="good")
    stranger = tmp_path / "known_hosts"
    stranger.write_text("")  # knows no host
    wrong_key = tmp_path / "wrong_key"
    keygen(wrong_key)
    specs = [
        good,
        ssh_hosts.spec(ssh_hosts.hosts[1], name="unknown-key", known_hosts=str(stranger)),
        ssh_hosts.spec(ssh_hosts.hosts[2], name="wrong-client-key", key=str(wrong_key)),
        {**ssh_hosts.spec(ssh_hosts.hosts[0], name="refused"), "port": free_port()},
    ]
    drv = SSHDockerVMMS(owner=f"ssh-{uuid.uuid4().hex[:8]}", hosts=specs, uid_base=UID_BASE,
                        uid_count=UIDS, connect_timeout=5)
    async with manager(drv, pool_size=2) as mgr:
        pool = await mgr.ensure_pool(GRADER_IMAGE)
        with anyio.fail_after(120):
            await pool.wait_until(lambda s: s.free == 2)
        assert set(spread(mgr)) == {"good"}
        st = drv.hosts()
        assert st["good"]["state"] == "up"
        fingerprint = (await _server_key(ssh_hosts.hosts[1].port)).get_fingerprint()
        unknown = st["unknown-key"]["error"] or ""
        assert "host unknown-key" in unknown and fingerprint in unknown, unknown
        assert "host wrong-client-key" in (st["wrong-client-key"]["error"] or "")
        assert "refused" in (st["wrong-client-key"]["error"] or "")
        assert "host refused" in (st["refused"]["error"] or "")
        h = await mgr.run(_job(tmp_path, 0, 0))
        assert h.result is not None and h.result.outcome is Outcome.SUCCESS


async def _server_key(port: int) -> Any:
    import asyncssh

    return await asyncssh.get_server_host_key("127.0.0.1", port)


async def test_a_drained_host_finishes_its_job_and_ends_with_no_vm(
        ssh_hosts: SSHHosts, tmp_path: Path) -> None:
    drv = driver(ssh_hosts, [1, 1, 1])
    async with manager(drv, pool_size=3, reuse_vms=True) as mgr:
        pool = await mgr.ensure_pool(GRADER_IMAGE)
        with anyio.fail_after(120):
            await pool.wait_until(lambda s: s.free == 3)
        target = ssh_hosts.hosts[0].name
        handles = [await mgr.submit(_job(tmp_path, i, 2)) for i in range(3)]
        with anyio.fail_after(60):
            await pool.wait_until(lambda s: busy_on(mgr, s.busy_ids, target))
        drv.drain_host(target)
        with anyio.fail_after(120):
            await mgr.join()
            await pool.wait_until(lambda s: target not in spread(mgr))
        assert all(h.result is not None and h.result.outcome is Outcome.SUCCESS
                   for h in handles)
        assert drv.hosts()[target] == {**drv.hosts()[target], "state": "draining", "vms": 0}
        assert target not in spread(mgr)
        drv.drain_host(target, False)
        pool.resize(3)
        with anyio.fail_after(60):
            await pool.wait_until(lambda s: s.free == 3)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CASES = {  # example -> (files, timeout, max output)
    "hello": (["Makefile"], 10, 0),
    "c-program": (["Makefile", "sum.c"], 30, 0),
    "python-grader": (["Makefile", "grader.py", "handin.py"], 30, 0),
    "timeout": (["Makefile"], 2, 0),
    "flood": (["Makefile"], 30, 10_000),
}


def _normalized(text: str) -> str:
    """An output file without what differs from run to run: times, job ids."""
    text = re.sub(r"Autograder \[[^\]]+\]", "Autograder [T]", text)
    return re.sub(r"Received job (\S+):\d+", r"Received job \1:N", text)


async def _run_examples(mgr: Manager, out: Path) -> dict[str, str]:
    out.mkdir()
    handles = {}
    for name, (files, timeout, max_output) in CASES.items():
        job = make_job(GRADER_IMAGE, [(str(EXAMPLES / name / f), f) for f in files],
                       str(out / f"{name}.out"), name=name, timeout=timeout,
                       max_output=max_output)
        handles[name] = await mgr.submit(job)
    with anyio.fail_after(180):
        await mgr.join()
    return {n: _normalized(Path(h.job.outputFile).read_text()) for n, h in handles.items()}


async def test_example_outputs_match_the_local_docker_driver(
        ssh_hosts: SSHHosts, docker_host: str, tmp_path: Path) -> None:
    """Tango's output files for the example jobs through a pool spread over
    3 SSH hosts are those of the Docker driver on the local engine."""
    from vmpool_drivers.docker import DockerVMMS

    drv = driver(ssh_hosts)
    async with manager(drv, pool_size=3) as mgr:
        pool = await mgr.ensure_pool(GRADER_IMAGE)
        with anyio.fail_after(120):
            await pool.wait_until(lambda s: s.free == 3)
        assert sorted(spread(mgr).values()) == [1, 1, 1]
        through_ssh = await _run_examples(mgr, tmp_path / "ssh")
    local = DockerVMMS(owner=f"local-{uuid.uuid4().hex[:8]}", url=docker_host,
                       uid_base=UID_BASE, uid_count=UIDS)
    async with Manager(driver_test_settings("docker", pool_size=3),
                       drivers={"docker": local}) as mgr:
        on_local = await _run_examples(mgr, tmp_path / "local")
    assert "tests passed: 100/100" in on_local["c-program"]
    assert "timed out after 2 seconds" in on_local["timeout"]
    assert "[excess bytes elided]" in on_local["flood"]
    for name in CASES:
        assert through_ssh[name] == on_local[name], name


async def test_the_server_shows_and_drains_hosts(ssh_hosts: SSHHosts, tmp_path: Path) -> None:
    """/hosts, /hosts/<key>/<host>/drain and /undrain, and /pool and /metrics
    per host, on a server whose default driver is ssh_docker."""
    from vmpool import Settings

    from .test_server import _running, make_config

    settings = Settings(default_vmms="ssh_docker", pool_size=3, driver_options={
        "ssh_docker": {"hosts": [ssh_hosts.spec(h, max_vms=2) for h in ssh_hosts.hosts],
                       "uid_base": UID_BASE, "uid_count": UIDS}})
    async with _running(make_config(tmp_path, settings)) as s:
        _, body, _ = await s.get(f"/prealloc/test/{GRADER_IMAGE.replace('/', '%2F')}/3")
        assert body["statusId"] == 0, body
        names = [h.name for h in ssh_hosts.hosts]
        with anyio.fail_after(120):
            while True:
                _, body, _ = await s.get("/pool/test")
                hosts = next(iter(body["pools"].values())).get("hosts", {})
                if sum(c["vms"] for c in hosts.values()) == 3:
                    break
                await anyio.sleep(0.1)  # bounded: the pool fills in the background
        assert sorted(hosts) == names and all(c["vms"] == 1 for c in hosts.values())
        _, body, _ = await s.get("/hosts/test")
        assert {h: v["state"] for h, v in body["hosts"]["ssh_docker"].items()} == {
            n: "up" for n in names}
        _, text, _ = await s.get("/metrics")
        assert f'vmpool_host_state{{driver="ssh_docker",host="{names[0]}",state="up"}} 1' \
            in text.decode()
        _, body = await s.post(f"/hosts/test/{names[0]}/drain")
        assert body["statusId"] == 0 and body["hosts"]["ssh_docker"][names[0]]["state"] \
            == "draining"
        with anyio.fail_after(60):
            while True:
                _, body, _ = await s.get("/pool/test")
                hosts = next(iter(body["pools"].values())).get("hosts", {})
                if names[0] not in hosts and sum(c["vms"] for c in hosts.values()) == 3:
                    break
                await anyio.sleep(0.1)  # bounded: destroy and refill in the background
        # the CLI: put it back, then list
        cli = [sys.executable, "-m", "vmpool.cli", "hosts", "--server", s.url, "--key", "test"]
        back = await anyio.run_process([*cli, "undrain", names[0]], check=False)
        assert back.returncode == 0, back.stderr
        assert f"Host {names[0]} back in use" in back.stdout.decode()
        _, body, _ = await s.get("/hosts/test")
        assert body["hosts"]["ssh_docker"][names[0]]["state"] == "up"
        listed = await anyio.run_process(cli, check=False)
        lines = listed.stdout.decode().splitlines()
        assert listed.returncode == 0 and [ln.split()[1] for ln in lines] == names, lines
        wrong = await anyio.run_process([*cli[:-1], "nope", "drain", names[0]], check=False)
        assert wrong.returncode == 1 and b"Key not recognized" in wrong.stderr
        _, body = await s.post("/hosts/test/nowhere/drain")
        assert body["statusId"] == -1 and "nowhere" in body["statusMsg"]
        _, body = await s.post(f"/hosts/wrong/{names[0]}/drain")
        assert body["statusMsg"] == "Key not recognized"


def _place_many(rooms: list[int], n: int) -> list[int]:
    """Where ``n`` VMs go on hosts of ``rooms`` (the placement rule alone)."""
    from vmpool import TangoMachine

    specs = [{"name": f"h{i}", "address": "127.0.0.1", "user": "u", "key": "k",
              "known_hosts": "kh", "max_vms": r} for i, r in enumerate(rooms)]
    drv = SSHDockerVMMS(hosts=specs)
    for h in drv._hosts.values():
        h.state = "up"
    for i in range(n):
        vm = TangoMachine(name="p", image="img", id=i + 1)
        best = drv.placement(vm)
        if not best:
            break
        best[0].vms[str(i)] = vm
    return [len(h.vms) for h in drv._hosts.values()]


def test_placement_rule_spreads_by_share_of_room() -> None:
    assert _place_many([20, 20, 20, 20], 40) == [10, 10, 10, 10]
    assert _place_many([8, 4], 6) == [4, 2]  # half the room, half the VMs
    assert _place_many([8, 4, 0], 20) == [8, 4, 0]
    assert _place_many([4, 4, 4], 12) == [4, 4, 4]
