"""The EC2 driver's fake cloud (tests/ec2_world.py) on its own: moto, one
container with a real sshd per instance, and the faults."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest
from botocore.exceptions import ClientError

from vmpool_drivers.ec2 import user_data as driver_user_data

from .ec2_world import EC2World, FaultProxy, MotoServer
from .sshd import keygen


# the EC2 tests' own moto server and world (tests/conftest.py), by shorter names
@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    return moto_server


@pytest.fixture
def world(ec2_world: EC2World) -> EC2World:
    return ec2_world


def host_key() -> tuple[str, str]:
    """A new ed25519 key: (OpenSSH private key, public key line)."""
    with tempfile.TemporaryDirectory() as d:
        pub = keygen(Path(d) / "k")
        return (Path(d) / "k").read_text(), pub


def user_data(private: str, public: str) -> str:
    """The user data the EC2 driver writes for an instance with this host key."""
    data = driver_user_data(asyncssh.import_private_key(private))
    assert public.split()[1] in data
    return data


def run(moto: MotoServer, n: int = 1, data: str | None = None) -> list[dict[str, Any]]:
    ami = moto.register_ami("vmpool-test-ami")
    kw: dict[str, Any] = {"UserData": data} if data is not None else {}
    r = moto.client().run_instances(ImageId=ami, MinCount=n, MaxCount=n,
                                    InstanceType="t3.micro", **kw)
    return list(r["Instances"])


async def ssh(world: EC2World, port: int, public: str, command: str) -> str:
    known = asyncssh.import_known_hosts(f"[127.0.0.1]:{port} {public}\n")
    async with asyncssh.connect("127.0.0.1", port, username="root", known_hosts=known,
                                client_keys=[str(world.key_file)], agent_path=None,
                                config=None, connect_timeout=10) as conn:
        r = await conn.run(command, check=True)
        return str(r.stdout)


async def test_instances_are_separate_machines(world: EC2World, moto: MotoServer) -> None:
    (priv_a, pub_a), (priv_b, pub_b) = host_key(), host_key()
    a = run(moto, data=user_data(priv_a, pub_a))[0]
    b = run(moto, data=user_data(priv_b, pub_b))[0]
    with anyio.fail_after(60):
        # the same id twice at once: one machine
        (ha, pa), again, (hb, pb) = await asyncio.gather(
            world.resolve(a), world.resolve(a), world.resolve(b))
    assert ha == hb == "127.0.0.1" and again == (ha, pa) and pa != pb
    assert await world.resolve(a) == (ha, pa)
    assert len(world.containers()) == 2
    ep_a, ep_b = world.endpoint_of(a["InstanceId"]), world.endpoint_of(b["InstanceId"])
    assert ep_a is not None and ep_b is not None and ep_a.port == pa
    with anyio.fail_after(30):
        uid_a = int(await ssh(world, pa, pub_a, "id -u autograde"))
        uid_b = int(await ssh(world, pb, pub_b, "id -u autograde"))
        assert uid_a == ep_a.uid and uid_b == ep_b.uid and uid_a != uid_b
        assert (await ssh(world, pa, pub_a, "stat -c %u /home/autograde")).strip() == str(uid_a)
        await ssh(world, pa, pub_a, "echo here > /home/autograde/mark")
        probe = "test -e /home/autograde/mark && echo yes || echo no"
        assert (await ssh(world, pa, pub_a, probe)).strip() == "yes"
        assert (await ssh(world, pb, pub_b, probe)).strip() == "no"
    # terminated: its machine goes away, its port refuses
    moto.client().terminate_instances(InstanceIds=[a["InstanceId"]])
    assert await world.sync() == [a["InstanceId"]]
    assert world.containers() == [f"vmpool-ec2-{b['InstanceId']}"]
    with anyio.fail_after(10), pytest.raises(ConnectionRefusedError):
        await ssh(world, pa, pub_a, "true")


async def test_faults(world: EC2World, moto: MotoServer) -> None:
    priv, pub = host_key()
    wrong, nowhere, good = run(moto, 3, user_data(priv, pub))
    world.wrong_host_key()
    world.unreachable()
    with anyio.fail_after(30):
        _, p_wrong = await world.resolve(wrong)
        _, p_nowhere = await world.resolve(nowhere)
        _, p_good = await world.resolve(good)
    assert len(world.containers()) == 2  # none for the unreachable one
    with anyio.fail_after(30):
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            await ssh(world, p_wrong, pub, "true")
        with pytest.raises(ConnectionRefusedError):
            await ssh(world, p_nowhere, pub, "true")
        assert (await ssh(world, p_good, pub, "whoami")).strip() == "root"

        # a cut drops the connections; the machine stays and answers again
        known = asyncssh.import_known_hosts(f"[127.0.0.1]:{p_good} {pub}\n")
        async with asyncssh.connect("127.0.0.1", p_good, username="root", known_hosts=known,
                                    client_keys=[str(world.key_file)], agent_path=None,
                                    config=None) as conn:
            proc = await conn.create_process("echo started; sleep 60")
            assert (await proc.stdout.readline()).strip() == "started"
            assert await world.cut(good["InstanceId"]) >= 1
            await conn.wait_closed()
        assert (await ssh(world, p_good, pub, "echo back")).strip() == "back"

        await world.kill_instance(good["InstanceId"])
        assert world.containers() == [f"vmpool-ec2-{wrong['InstanceId']}"]
        with pytest.raises(ConnectionRefusedError):
            await ssh(world, p_good, pub, "true")


async def test_keyless_user_data_and_stop_start(world: EC2World, moto: MotoServer) -> None:
    inst = run(moto)[0]  # no user data: the machine makes its own host key
    iid = inst["InstanceId"]
    with anyio.fail_after(60):
        _, port = await world.resolve(inst)
        ep = world.endpoint_of(iid)
        assert ep is not None and ep.host_key_line is not None
        await ssh(world, port, ep.host_key_line, "touch /root/disk")
        moto.client().stop_instances(InstanceIds=[iid])
        assert await world.resolve(inst) == ("127.0.0.1", port)
        with pytest.raises(ConnectionRefusedError):
            await ssh(world, port, ep.host_key_line, "true")
        moto.client().start_instances(InstanceIds=[iid])
        assert await world.resolve(inst) == ("127.0.0.1", port)
        # same disk after a stop and a start
        await ssh(world, port, ep.host_key_line, "test -e /root/disk")


async def test_sixteen_at_once(world: EC2World, moto: MotoServer) -> None:
    priv, pub = host_key()
    instances = run(moto, 16, user_data(priv, pub))
    start = time.monotonic()
    with anyio.fail_after(60):
        ends = await asyncio.gather(*(world.resolve(i) for i in instances))
    took = time.monotonic() - start
    assert len({port for _, port in ends}) == 16
    assert len(world.containers()) == 16
    uids = {ep.uid for ep in world.endpoints().values()}
    assert len(uids) == 16
    with anyio.fail_after(30):
        outs = await asyncio.gather(*(ssh(world, p, pub, "id -u autograde") for _, p in ends))
    assert len({o.strip() for o in outs}) == 16
    print(f"16 machines in {took:.1f} s")


def test_fault_proxy(moto: MotoServer) -> None:
    ami = moto.register_ami("vmpool-proxy-ami")
    with FaultProxy(moto.url) as proxy:
        ec2 = moto.client(proxy.url)
        proxy.refuse("RunInstances")
        with pytest.raises(ClientError) as e:
            ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)
        assert e.value.response["Error"]["Code"] == "InsufficientInstanceCapacity"
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert proxy.refused == 1 and proxy.calls("RunInstances") == 0
        r = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)
        assert proxy.calls("RunInstances") == 1
        iid = r["Instances"][0]["InstanceId"]
        found = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"]
        assert found[0]["InstanceId"] == iid

        proxy.refuse("RunInstances", "InsufficientInstanceCapacity", n=1, spot_only=True)
        ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)  # on demand: forwarded
        with pytest.raises(ClientError, match="InsufficientInstanceCapacity"):
            ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1,
                              InstanceMarketOptions={"MarketType": "spot"})
        assert proxy.refused == 2 and proxy.calls("RunInstances") == 2

        proxy.delay("DescribeInstances", 0.3)
        t = time.monotonic()
        ec2.describe_instances()
        assert time.monotonic() - t >= 0.3
        proxy.delay("DescribeInstances", 0)
        assert proxy.calls("DescribeInstances") == 2
    moto.reset()
