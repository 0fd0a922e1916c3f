"""The driver contract (tests/driver_contract.py), run against the Docker driver.

A real engine (the session fixture ``docker_host`` starts one and builds
the grading image, and fails loudly, never skips, when it cannot) with the
image vmpool/grader:latest. Each test's drivers have owners of its own and
grading uids from a range apart from the other modules' (67000..). What is
left of an owner: its containers (by the owner label, running or not), its
uid claims, and processes of the range's uids on this host (the engine runs
here) other than those another owner holds.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.driver_contract")

from vmpool_drivers.docker import DockerVMMS  # noqa: E402

from .conftest import GRADER_IMAGE  # noqa: E402
from .driver_contract import *  # noqa: E402, F403
from .driver_contract import Target  # noqa: E402
from .jobs import docker_leftovers  # noqa: E402

UID_BASE = 67000
UIDS = 100



@pytest.fixture
async def contract_target(docker_host: str) -> Target:
    uids = range(UID_BASE, UID_BASE + UIDS)

    async def make_driver(*, owner: str) -> DockerVMMS:
        return DockerVMMS(owner=owner, url=docker_host, uid_base=UID_BASE, uid_count=UIDS)

    async def leftovers(driver: DockerVMMS) -> list[str]:
        return await docker_leftovers(docker_host, driver.owner, uids)

    return Target(name="docker", image=GRADER_IMAGE, make_driver=make_driver,
                  leftovers=leftovers)
