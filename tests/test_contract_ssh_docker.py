"""The driver contract (tests/driver_contract.py), run against the SSH Docker
driver: three real sshd "hosts" on 127.0.0.1 (tests/sshd.py) in front of
the one engine the tests run, each with room for 4 VMs. What is left of an
owner: its containers on the engine (by the owner label), its uid claims,
and processes of the range's uids other than those another owner holds.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.driver_contract")

from vmpool_drivers.ssh_docker import SSHDockerVMMS  # noqa: E402

from .conftest import GRADER_IMAGE  # noqa: E402
from .driver_contract import *  # noqa: E402, F403
from .driver_contract import Target  # noqa: E402
from .jobs import docker_leftovers  # noqa: E402
from .sshd import SSHHosts  # noqa: E402

UID_BASE = 68000
UIDS = 100


@pytest.fixture
async def contract_target(docker_host: str, ssh_hosts: SSHHosts) -> Target:
    uids = range(UID_BASE, UID_BASE + UIDS)

    async def make_driver(*, owner: str) -> SSHDockerVMMS:
        return SSHDockerVMMS(owner=owner, hosts=[ssh_hosts.spec(h) for h in ssh_hosts.hosts],
                             uid_base=UID_BASE, uid_count=UIDS)

    async def leftovers(driver: SSHDockerVMMS) -> list[str]:
        return await docker_leftovers(docker_host, driver.owner, uids)

    return Target(name="ssh_docker", image=GRADER_IMAGE, make_driver=make_driver,
                  leftovers=leftovers)
