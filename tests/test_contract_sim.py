"""The driver contract (tests/driver_contract.py), run against the sim driver.

Its drivers share one SimWorld (the sim's "cloud"): several owners, and a
closed driver's VMs left in it, are what the orphan rules need. What is
"left on the host" is the world's live record of the owner's VMs. The sim
cannot show a running job's output (partialOutput), so "the job is
running" is "runJob was entered".
"""

from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("tests.driver_contract")

from vmpool_drivers.sim import SimVMMS  # noqa: E402
from vmpool_drivers.sim.driver import SimWorld  # noqa: E402

from .driver_contract import *  # noqa: E402, F403
from .driver_contract import Target  # noqa: E402
from .sim_mutants import MUTANTS  # noqa: E402

IMAGE = "contract.img"


@pytest.fixture
async def contract_target() -> Target:
    world = SimWorld()
    # tests/test_contract_mutations.py runs the suite on drivers that each
    # break one rule
    mutant = os.environ.get("VMPOOL_SIM_MUTANT")
    cls = MUTANTS[mutant][0] if mutant else SimVMMS

    async def make_driver(*, owner: str) -> SimVMMS:
        return cls(owner=owner, world=world, images=[IMAGE])

    async def leftovers(driver: SimVMMS) -> list[str]:
        return sorted(f"live VM {name}" for name, owner in world.owners.items()
                      if owner == driver.owner and name in world.live)

    return Target(name="sim", image=IMAGE, make_driver=make_driver, leftovers=leftovers,
                  reports_partial_output=False)
