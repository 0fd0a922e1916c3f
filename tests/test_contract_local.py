"""The driver contract (tests/driver_contract.py), run against the local driver.

Real sandboxes: bubblewrap, a uid of its own per VM, as root (the driver
refuses to start otherwise, and the tests fail, never skip). Each test gets
its own state directory and a range of 20 uids (66000.., apart from the
other modules' ranges). What is left of an owner on this host: its sandbox
directories, its uid claims, its cgroups, processes of the test's uids
(other than those another owner holds), and its directory and lock file
once its driver is gone.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.driver_contract")

from vmpool.vmms import safe_name  # noqa: E402
from vmpool_drivers.liveness import dead_owner  # noqa: E402
from vmpool_drivers.local import LocalVMMS  # noqa: E402

from .driver_contract import *  # noqa: E402, F403
from .driver_contract import Target  # noqa: E402
from .jobs import claims, processes_of  # noqa: E402

UID_BASE = 66000
UIDS = 20
_slots = itertools.count()



@pytest.fixture
async def contract_target(tmp_path: Path) -> Target:
    state = tmp_path / "state"
    uid_base = UID_BASE + UIDS * next(_slots)
    uids = range(uid_base, uid_base + UIDS)

    async def make_driver(*, owner: str) -> LocalVMMS:
        return LocalVMMS(owner=owner, state_dir=str(state), uid_base=uid_base, uid_count=UIDS)

    async def leftovers(driver: LocalVMMS) -> list[str]:
        owner = driver.owner
        found: list[str] = []
        owner_dir = state / owner
        if owner_dir.is_dir():
            found += [f"sandbox {p}" for p in sorted(owner_dir.iterdir())]
        held = claims(uids)
        found += [f"uid claim {u} ({h})" for u, h in held.items() if h.startswith(f"{owner}/")]
        others = {u for u, h in held.items() if not h.startswith(f"{owner}/")}
        found += [f"process {p}" for p in processes_of(set(uids) - others)]
        for ctrl in ("pids", "memory", ""):
            parent = Path("/sys/fs/cgroup") / ctrl / "vmpool"
            if parent.is_dir():
                found += [f"cgroup {p}" for p in
                          sorted(parent.glob(f"{safe_name(f'vmpool-{owner}-')}*"))]
        lock = state / f"{owner}.lock"
        if lock.exists():
            with dead_owner(lock) as dead:
                if dead:  # its driver is gone: its directory and lock go with its VMs
                    found.append(f"lock file {lock} of a gone driver")
        return found

    return Target(name="local", image="default", make_driver=make_driver, leftovers=leftovers)
