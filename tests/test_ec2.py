"""The EC2 driver against moto in server mode (the real aiobotocore client)
and a real sshd per instance (tests/ec2_world.py): a machine of its own per
instance, reached only on 127.0.0.1.

Shown here: a job's output file; tags from birth; nothing left after
close; a crashed manager's instances terminated at the next start;
job-owned instances terminated after their job, also when it fails; 16
instances at once; a stopped warm instance started and used; each fault
(run_instances refused, an instance never reachable, the connection cut
mid-job, a wrong host key, spot refused, a spot instance interrupted) with
a clear line in the output file and nothing lost; clear errors for a wrong
credential, region or AMI.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from vmpool import InitializeVMError, Manager, Outcome, Pool, TangoMachine, make_job
from vmpool_drivers.ec2 import EC2VMMS
from vmpool_drivers.ec2.driver import TAG_OWNER, TAG_ROLE

from .ec2_world import EC2World, FaultProxy, MotoServer, driver_options
from .jobs import driver_test_settings, until

IMAGE = "grader"
ROOT = Path(__file__).resolve().parents[1]

HELLO = b"all:\n\t@echo hello from $$(hostname) as $$(id -un)\n"
SLOW = b"all:\n\t@echo started; sleep 30; echo never\n"


def instances(moto: MotoServer, **filters: str) -> list[dict[str, Any]]:
    """Every instance moto has, with ``tag:KEY=VALUE`` filters."""
    flt = [{"Name": f"tag:{k}", "Values": [v]} for k, v in filters.items()]
    found = []
    for r in moto.client().describe_instances(Filters=flt)["Reservations"]:
        found.extend(r["Instances"])
    return found


def states(moto: MotoServer, **filters: str) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in instances(moto, **filters)}


def tags(inst: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in inst.get("Tags") or []}


def job(tmp: Path, name: str, makefile: bytes = HELLO, *, timeout: int = 20,
        access: tuple[str, str] | None = None) -> Any:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "Makefile").write_bytes(makefile)
    j = make_job(IMAGE, [(str(d / "Makefile"), "Makefile")], str(tmp / f"{name}.out"),
                 name=name, timeout=timeout)
    if access is not None:
        j.accessKeyId, j.accessKey = access
    return j


@asynccontextmanager
async def manager(world: EC2World, ami: str, *, url: str | None = None,
                  settings: dict[str, Any] | None = None,
                  **options: Any) -> AsyncIterator[tuple[Manager, EC2VMMS]]:
    drv = EC2VMMS(owner=options.pop("owner", None), **driver_options(world, ami, url=url,
                                                                    **options))
    s = driver_test_settings("ec2", **(settings or {}))
    async with Manager(s, drivers={"ec2": drv}) as mgr:
        yield mgr, drv


async def warm(mgr: Manager, n: int) -> Pool:
    """The image's pool, once ``n`` VMs of it are free."""
    pool = await mgr.ensure_pool(IMAGE)
    with anyio.fail_after(60):
        await pool.wait_until(lambda s: s.free == n)
    return pool


async def running(drv: EC2VMMS, h: Any) -> bool:
    """Whether the job of handle ``h`` is running (its VM shows its output)."""
    return h.vm is not None and await drv.partialOutput(h.vm) is not None


def output(j: Any) -> str:
    return Path(j.outputFile).read_text()


# --------------------------------------------------------------------------


async def test_a_job_through_an_ec2_pool(ec2_world: EC2World, moto_server: MotoServer,
                                         tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    async with manager(ec2_world, ami, settings={"pool_size": 2}) as (mgr, drv):
        pool = await warm(mgr, 2)
        h = await mgr.run(job(tmp_path, "hello"))
        assert h.result is not None and h.result.outcome is Outcome.SUCCESS, output(h.job)
        text = output(h.job)
        assert "Autodriver: Job exited with status 0" in text and "hello from" in text
        assert "as autograde" in text  # the autodriver ran it as the grading user
        with anyio.fail_after(60):  # the used VM is replaced
            await pool.wait_until(lambda s: s.free == 2)
        mine = instances(moto_server, **{TAG_OWNER: drv.owner})
        assert len(mine) == 3, mine  # 2 warm, the one used (terminated)
        for inst in mine:
            # the metadata endpoint (user data: the host key) is off before any job
            assert inst["MetadataOptions"]["HttpEndpoint"] == "disabled", inst["InstanceId"]
            t = tags(inst)
            assert t["vmpool:pool"] == IMAGE and t["vmpool:image"] == IMAGE
            assert t[TAG_ROLE] == "pool" and t["vmpool:vm"].isdigit()
        # the pool's status shows the instance-hours used
        usage = pool.status().to_dict()["usage"]
        assert usage["running"] >= 2 and usage["running_hours"] > 0
        assert pool.status().to_dict()["usage"]["stopped_hours"] == 0
    # after close: every instance terminated, no machine left
    left = states(moto_server, **{TAG_OWNER: drv.owner})
    assert left and set(left.values()) == {"terminated"}, left
    await ec2_world.sync()
    assert ec2_world.containers() == []


async def test_every_instance_is_tagged_from_birth(ec2_world: EC2World,
                                                   moto_server: MotoServer) -> None:
    # Tags go with run_instances itself: moto's state right after that one
    # call (initializeVM, before any waitVM) has them all.
    ami = moto_server.register_ami("grader")
    drv = EC2VMMS(owner="born-tagged", **driver_options(ec2_world, ami))
    try:
        vm = TangoMachine(name=IMAGE, image=IMAGE, id=7)
        calls_before = drv.counters["run_instances"]
        await drv.initializeVM(vm)
        assert drv.counters["run_instances"] == calls_before + 1
        (inst,) = instances(moto_server, **{TAG_OWNER: "born-tagged"})
        assert inst["InstanceId"] == vm.instance_id
        t = tags(inst)
        assert t["Name"] == "local-7-grader" and t["vmpool:vm"] == "7"
        assert t["vmpool:process"] and t[TAG_ROLE] == "pool"
        await drv.safeDestroyVM(vm)
        assert states(moto_server, **{TAG_OWNER: "born-tagged"}) == {vm.instance_id:
                                                                     "terminated"}
    finally:
        await drv.close()


CRASH = """
import asyncio, os, sys
sys.path.insert(0, {root!r})
from vmpool.models import TangoMachine
from vmpool_drivers.ec2 import EC2VMMS
async def main():
    drv = EC2VMMS(owner={owner!r}, images={{"grader": {ami!r}}}, endpoint_url={url!r},
                  region="us-east-1", access_key_id="testing", secret_access_key="testing")
    for i in (1, 2):
        await drv.initializeVM(TangoMachine(name="grader", image="grader", id=i))
    os._exit(0)  # a crash: no close, no destroy
asyncio.run(main())
"""


async def test_a_crashed_managers_instances_are_terminated_at_the_next_start(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    script = CRASH.format(root=str(ROOT), owner="crashed", ami=ami, url=moto_server.url)
    await anyio.run_process([sys.executable, "-c", script], check=True)
    left = states(moto_server, **{TAG_OWNER: "crashed"})
    assert len(left) == 2 and set(left.values()) == {"running"}
    # a live manager of another owner is never touched by it
    async with manager(ec2_world, ami, owner="crashed", settings={"pool_size": 0}) as (
            mgr, _):
        await mgr.driver("ec2")  # loading the driver reconciles it
        assert set(states(moto_server, **{TAG_OWNER: "crashed"}).values()) == {"terminated"}


async def test_a_job_owned_instance_is_terminated_after_its_job_also_when_it_fails(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    async with manager(ec2_world, ami, settings={"pool_size": 1}) as (mgr, drv):
        await warm(mgr, 1)
        pooled = set(states(moto_server, **{TAG_OWNER: drv.owner, TAG_ROLE: "pool"}))
        # a job with its own credentials: its own instance, never the pool's
        j = job(tmp_path, "owned", access=("AKIAJOBOWNED", "job-secret"))
        h = await mgr.run(j)
        assert h.result is not None and h.result.outcome is Outcome.SUCCESS, output(j)
        owned = states(moto_server, **{TAG_OWNER: drv.owner, TAG_ROLE: "job"})
        assert len(owned) == 1 and set(owned.values()) == {"terminated"}, owned
        assert set(states(moto_server, **{TAG_OWNER: drv.owner, TAG_ROLE: "pool"})) == pooled
        # a job that fails (its instance is gone mid-job, every try): each
        # try's job-owned instance is terminated all the same
        j2 = job(tmp_path, "owned-fails", SLOW, access=("AKIAJOBOWNED", "job-secret"))
        h2 = await mgr.submit(j2)
        seen: set[str] = set()

        async def kill_each_try() -> bool:
            # every try's instance goes once its job runs
            if h2.result is not None:
                return True
            if await running(drv, h2) and h2.vm.instance_id not in seen:
                seen.add(h2.vm.instance_id)
                await ec2_world.kill_instance(h2.vm.instance_id)
            return False

        await until(kill_each_try, 120)
        assert len(seen) == 3
        assert h2.result.outcome is Outcome.INTERNAL_ERROR, output(j2)
        assert "Try 1 failed" in output(j2) and "SSH connection lost" in output(j2)
        after = states(moto_server, **{TAG_OWNER: drv.owner, TAG_ROLE: "job"})
        assert len(after) == 1 + 3 and set(after.values()) == {"terminated"}, after


async def test_sixteen_instances_at_once(ec2_world: EC2World, moto_server: MotoServer) -> None:
    # moto answers at once: 16 creations run together (create_concurrency),
    # not one after another as Tango's ec2SSH makes them
    ami = moto_server.register_ami("grader")
    with FaultProxy(moto_server.url) as proxy:
        async with manager(ec2_world, ami, url=proxy.url,
                           settings={"pool_size": 16, "create_concurrency": 16},
                           max_instances=16) as (mgr, drv):
            pool = await mgr.ensure_pool(IMAGE)
            with anyio.fail_after(120):
                await pool.wait_until(lambda s: s.free == 16)
            assert proxy.calls("RunInstances") == 16
            assert len(ec2_world.containers()) == 16
            assert drv.usage()[IMAGE]["running"] == 16
    assert set(states(moto_server).values()) == {"terminated"}


async def test_a_stopped_warm_instance_is_started_and_used(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    other = moto_server.register_ami("other")
    # two pools with a stock each: taking one's instance restocks that one
    async with manager(ec2_world, ami, settings={"pool_size": 0, "pool_max_size": 2},
                       images={IMAGE: ami, "other": other},
                       stopped_warm={IMAGE: 1, "other": 1}) as (mgr, drv):
        await mgr.ensure_pool(IMAGE)
        await until(lambda: len(drv._stock.get(IMAGE, {})) == 1
                    and len(drv._stock.get("other", {})) == 1, 60)
        (stopped,) = drv._stock[IMAGE]
        assert states(moto_server)[stopped] == "stopped"
        assert drv.usage()[IMAGE]["stopped"] == 1
        h = await mgr.run(job(tmp_path, "from-stopped"))
        assert h.result is not None and h.result.outcome is Outcome.SUCCESS, output(h.job)
        assert drv.counters["start_instances"] == 1
        # the job ran on the instance that was stopped (started for it)
        assert h.vm is not None and h.vm.instance_id == stopped
        # and the stock is made again (the other pool's is left as it was)
        await until(lambda: len(drv._stock.get(IMAGE, {})) == 1, 60)
        assert next(iter(drv._stock[IMAGE])) != stopped
        assert len(drv._stock["other"]) == 1
        use = drv.usage()[IMAGE]
        assert use["stopped_hours"] > 0 and use["running_hours"] > 0
    assert set(states(moto_server).values()) == {"terminated"}


async def test_a_job_past_the_remote_hard_deadline_is_a_timeout(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    # The VM's own deadline (timeout -s KILL) stops an autodriver that did
    # not stop the job: a timeout of the job (exit 2, said so), not a lost
    # connection. (The deadline is moved before the autodriver's own to
    # make it fire: an autodriver that hangs cannot be made on purpose.)
    ami = moto_server.register_ami("grader")
    async with manager(ec2_world, ami, settings={"pool_size": 1}) as (mgr, drv):
        drv.hard_deadline_grace = -2.0
        h = await mgr.run(job(tmp_path, "hard", SLOW, timeout=4))
    assert h.result is not None and h.result.outcome is Outcome.TIMEOUT, output(h.job)
    text = output(h.job)
    assert "killed at the VM's hard deadline (2 s)" in text and "Try 1" not in text, text


async def test_a_job_that_disables_the_network_reaches_nothing(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    # The instances here share the host's network (127.0.0.1: moto, the
    # tests' sshd): a job that disables it (Tango's default) runs in a
    # network namespace of its own and reaches none of it; one that keeps
    # it does.
    ami = moto_server.register_ami("grader")
    port = int(moto_server.url.rsplit(":", 1)[1])
    probe = ("all:\n\t@python3 -c \"import socket; s = socket.socket(); s.settimeout(3); "
             f"r = s.connect_ex(('127.0.0.1', {port})); "
             "print('REACHED' if r == 0 else 'BLOCKED', r)\"\n").encode()
    async with manager(ec2_world, ami, settings={"pool_size": 1}) as (mgr, _):
        cut_off = job(tmp_path, "no-net", probe)
        assert cut_off.disableNetwork
        allowed = job(tmp_path, "net", probe)
        allowed.disableNetwork = False
        for j in (cut_off, allowed):
            h = await mgr.run(j)
            assert h.result is not None and h.result.outcome is Outcome.SUCCESS, output(j)
    assert "BLOCKED" in output(cut_off) and "REACHED" not in output(cut_off), output(cut_off)
    assert "REACHED" in output(allowed), output(allowed)


# --------------------------------------------------------------------------
# Faults: a clear line in the output file, nothing lost


async def test_run_instances_refused_for_capacity(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    with FaultProxy(moto_server.url) as proxy:
        proxy.refuse("RunInstances", code="InsufficientInstanceCapacity", n=1)
        async with manager(ec2_world, ami, url=proxy.url,
                           settings={"pool_size": 0, "pool_max_size": 1}) as (mgr, _):
            h = await mgr.run(job(tmp_path, "refused"))
        assert proxy.refused == 1
    assert h.result is not None and h.result.outcome is Outcome.SUCCESS, output(h.job)
    text = output(h.job)
    assert "Try 1 failed" in text and "InsufficientInstanceCapacity" in text, text


async def test_an_instance_never_reachable_times_out_and_the_job_runs_elsewhere(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    ec2_world.unreachable(1)
    async with manager(ec2_world, ami, settings={"pool_size": 0, "pool_max_size": 1,
                                                 "waitvm_timeout": 3}) as (mgr, drv):
        h = await mgr.run(job(tmp_path, "unreachable"))
    assert h.result is not None and h.result.outcome is Outcome.SUCCESS, output(h.job)
    text = output(h.job)
    assert "Try 1 failed" in text and "waitVM" in text, text
    assert set(states(moto_server, **{TAG_OWNER: drv.owner}).values()) == {"terminated"}


async def test_a_connection_cut_during_runjob_is_retried_on_a_new_instance(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    async with manager(ec2_world, ami, settings={"pool_size": 1}) as (mgr, drv):
        await warm(mgr, 1)
        makefile = b"all:\n\t@echo started; sleep 4; echo done\n"
        h = await mgr.submit(job(tmp_path, "cut", makefile))
        await until(lambda: running(drv, h), 60)
        first = h.vm.instance_id
        assert first is not None and await ec2_world.cut(first) > 0
        with anyio.fail_after(60):
            result = await h.wait()
        assert result.outcome is Outcome.SUCCESS, output(h.job)
        text = output(h.job)
        assert "Try 1 failed" in text and "SSH connection lost" in text, text
        assert h.job.vm.id is not None
        # the cut instance was replaced (terminated), not reused
        assert states(moto_server)[first] == "terminated"


async def test_a_host_key_that_is_not_the_pinned_one_is_refused(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    ec2_world.wrong_host_key(1)
    async with manager(ec2_world, ami, settings={"pool_size": 0, "pool_max_size": 1}) as (
            mgr, _):
        h = await mgr.run(job(tmp_path, "hostkey"))
    assert h.result is not None and h.result.outcome is Outcome.SUCCESS, output(h.job)
    text = output(h.job)
    assert "Try 1 failed" in text and "host key that is not the one made for it" in text, text
    faulty = [iid for iid, ep in ec2_world.endpoints().items() if ep.fault == "wrong_host_key"]
    assert len(faulty) == 1 and states(moto_server)[faulty[0]] == "terminated"


async def test_spot_refused_falls_back_to_on_demand(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    with FaultProxy(moto_server.url) as proxy:
        proxy.refuse("RunInstances", code="InsufficientInstanceCapacity", n=1, spot_only=True)
        async with manager(ec2_world, ami, url=proxy.url, spot=True,
                           settings={"pool_size": 2}) as (mgr, drv):
            pool = await mgr.ensure_pool(IMAGE)
            with anyio.fail_after(60):
                await pool.wait_until(lambda s: s.free == 2)
            assert drv.counters["spot_fallbacks"] == 1 and proxy.refused == 1
            lifecycles = sorted(i.get("InstanceLifecycle", "on-demand")
                                for i in instances(moto_server, **{TAG_OWNER: drv.owner}))
            assert lifecycles == ["on-demand", "spot"]
            h = await mgr.run(job(tmp_path, "spot"))
            assert h.result is not None and h.result.outcome is Outcome.SUCCESS


async def test_an_interrupted_spot_instance_fails_its_try_and_the_job_is_rerun(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    ami = moto_server.register_ami("grader")
    async with manager(ec2_world, ami, spot=True, settings={"pool_size": 1}) as (mgr, drv):
        await warm(mgr, 1)
        h = await mgr.submit(job(tmp_path, "interrupted", SLOW, timeout=40))
        await until(lambda: running(drv, h), 60)
        iid = h.vm.instance_id
        assert iid is not None
        # EC2 takes the capacity back: the instance is terminated, its machine gone
        moto_server.client().terminate_instances(InstanceIds=[iid])
        await ec2_world.kill_instance(iid)
        await until(lambda: h.job.retries > 0, 60)
        h.cancel("test done")  # the rerun would take 30 s
        with anyio.fail_after(60):
            await h.wait()
    text = output(h.job)
    assert "Try 1 failed" in text and f"spot instance {iid} was interrupted" in text, text


# --------------------------------------------------------------------------
# Clear errors at the first use


async def test_wrong_credentials_region_or_ami_are_named_at_once(
        ec2_world: EC2World, moto_server: MotoServer) -> None:
    ami = moto_server.register_ami("grader")

    async def first_use(**options: Any) -> str:
        drv = EC2VMMS(**{**driver_options(ec2_world, ami), **options})
        try:
            with pytest.raises(InitializeVMError) as e:
                await drv.getImages()
            with pytest.raises(InitializeVMError) as e2:
                await drv.initializeVM(TangoMachine(name=IMAGE, image=IMAGE, id=1))
            return f"{e.value} | {e2.value}"
        finally:
            await drv.close()

    with FaultProxy(moto_server.url) as proxy:
        proxy.refuse("DescribeImages", code="AuthFailure", n=1,
                     message="AWS was not able to validate the provided access credentials")
        proxy.refuse("RunInstances", code="AuthFailure", n=1)
        text = await first_use(endpoint_url=proxy.url)
        assert text.count("EC2 refused the credentials") == 2, text
    text = await first_use(region="us-nowhere-1")
    assert "unknown region 'us-nowhere-1'" in text, text
    text = await first_use(images={IMAGE: "ami-00000000deadbeef0"})
    assert "ami-00000000deadbeef0" in text and "does not exist" in text, text
    text = await first_use(profile="no-such-profile", access_key_id=None,
                           secret_access_key=None)
    assert "no-such-profile" in text, text
    assert states(moto_server) == {}  # not one instance made


def test_the_user_data_installs_the_generated_host_key() -> None:
    import asyncssh
    import yaml  # type: ignore[import-untyped]

    from vmpool_drivers.ec2 import user_data

    key = asyncssh.generate_private_key("ssh-ed25519")
    data = yaml.safe_load(user_data(key))
    assert data["ssh_deletekeys"] is True and data["ssh_genkeytypes"] == []
    private = asyncssh.import_private_key(data["ssh_keys"]["ed25519_private"])
    assert private.export_public_key() == key.export_public_key()
    assert data["ssh_keys"]["ed25519_public"] == key.export_public_key().decode().strip()


async def test_a_server_with_a_wrong_ami_does_not_start(
        ec2_world: EC2World, moto_server: MotoServer, tmp_path: Path) -> None:
    # `vmpool serve` checks the EC2 driver (credentials, region, AMIs) when
    # it starts: one clear line and exit status 1, not a server whose every
    # job fails later
    config = tmp_path / "vmpool.toml"
    config.write_text(f"""
[server]
port = 0
keys = ["k"]
courselabs = "{tmp_path / 'labs'}"
database = "{tmp_path / 'jobs.sqlite'}"

[vmpool]
default_vmms = "ec2"
pool_size = 0

[drivers.ec2]
endpoint_url = "{moto_server.url}"
region = "us-east-1"
access_key_id = "testing"
secret_access_key = "testing"
images = {{ grader = "ami-0000000000badbad0" }}
""")
    vmpool = Path(sys.executable).with_name("vmpool")
    with anyio.fail_after(60):
        done = await anyio.run_process([str(vmpool), "serve", "--config", str(config)],
                                       check=False, stdin=subprocess.DEVNULL)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "ami-0000000000badbad0" in err and "not found" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
