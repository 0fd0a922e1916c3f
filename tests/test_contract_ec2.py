"""The driver contract (tests/driver_contract.py), run against the EC2
driver: moto in server mode as the EC2 endpoint and a real sshd per
instance (tests/ec2_world.py). What is left of an owner: its instances that
moto does not show terminated, and the machines of those instances."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.driver_contract")

from vmpool_drivers.ec2 import EC2VMMS  # noqa: E402
from vmpool_drivers.ec2.driver import TAG_OWNER  # noqa: E402

from .driver_contract import *  # noqa: E402, F403
from .driver_contract import Target  # noqa: E402
from .ec2_world import EC2World, MotoServer, driver_options  # noqa: E402

IMAGE = "grader"


@pytest.fixture
async def contract_target(ec2_world: EC2World, moto_server: MotoServer) -> Target:
    ami = moto_server.register_ami(IMAGE)

    async def make_driver(*, owner: str) -> EC2VMMS:
        return EC2VMMS(owner=owner, **driver_options(ec2_world, ami, image=IMAGE))

    async def leftovers(driver: EC2VMMS) -> list[str]:
        found = moto_server.client().describe_instances(Filters=[
            {"Name": f"tag:{TAG_OWNER}", "Values": [driver.owner]}])
        left = [f"instance {i['InstanceId']} {i['State']['Name']}"
                for r in found["Reservations"] for i in r["Instances"]
                if i["State"]["Name"] != "terminated"]
        await ec2_world.sync()  # the machines of terminated instances go
        ours = {i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]}
        left += [f"machine of {iid} still up" for iid, ep in ec2_world.endpoints().items()
                 if iid in ours and ep.container is not None and ep.running]
        return left

    return Target(name="ec2", image=IMAGE, make_driver=make_driver, leftovers=leftovers)
