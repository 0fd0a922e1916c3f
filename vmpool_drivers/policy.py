"""The sandbox policy every driver applies, in one place.

What a job may see and do is the same on every driver (README, "Security
model"); this module holds the parts the drivers share: the capabilities
the autodriver keeps as root in a sandbox or container, the autodriver's
own environment, the disk quotas, and the host-wide registry of grading uids
(the job's environment is given as the autodriver's ``--env`` options, built
by :func:`autodriver.arguments`).
The bubblewrap command of the local driver is in ``vmpool_drivers/local/sandbox.py``;
what the job itself is refused (user namespaces, the kernel keyring,
``open_by_handle_at``: a seccomp filter, and ``PR_SET_NO_NEW_PRIVS``) is
installed by the autodriver in the job's process on every driver.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from autodriver import autodriver as _autodriver

#: What the autodriver needs as root in a sandbox or container, and nothing
#: else: switch to the grading uid (SETUID, SETGID), hand it the job's files
#: and clean up after it (CHOWN, FOWNER, DAC_OVERRIDE), kill every process of
#: the job (KILL), and protect itself from the OOM killer with
#: ``oom_score_adj -1000`` (SYS_RESOURCE), so that a job that fills memory is
#: the one killed and its output is kept. Never DAC_READ_SEARCH: it adds
#: nothing to DAC_OVERRIDE for the autodriver and is the capability behind
#: ``open_by_handle_at`` escapes. The job itself runs with no capability.
AUTODRIVER_CAPS: tuple[str, ...] = (
    "CHOWN", "SETUID", "SETGID", "FOWNER", "KILL", "DAC_OVERRIDE", "SYS_RESOURCE",
)

#: The PATH a job gets unless its image says otherwise (the autodriver's own
#: default: the one file that runs in every VM defines it)
DEFAULT_PATH = _autodriver.DEFAULT_PATH

#: The autodriver's own environment in a sandbox: nothing of the server's.
#: (The autodriver hands the job its own short list: PATH, HOME, USER,
#: LOGNAME, LANG, LC_ALL, TERM=dumb, plus what the image or pool declares.)
SANDBOX_ENV: Mapping[str, str] = {
    "PATH": DEFAULT_PATH,
    "HOME": "/root",
    "LANG": "C.UTF-8",
}

#: A job's files (job directory, /tmp, /var/tmp, /dev/shm) may use at most
#: this many bytes and inodes per VM, unless the driver is told otherwise.
DEFAULT_DISK_QUOTA = 1 << 30
DEFAULT_INODE_QUOTA = 100_000

#: Where grading uids are claimed, host-wide: every driver that runs jobs
#: as host uids (the local driver's sandboxes, a local Docker engine's
#: containers) claims them here, so that no two jobs ever share one.
UID_DIR = "/run/vmpool/uids"


class UidRegistry:
    """Grading uids claimed host-wide by an atomic ``mkdir`` per uid.

    A claim ``<dir>/<uid>/owner`` names ``<owner>/<vm>``. A uid is released
    only once no process of it is left (the caller checks), and a claim is
    only acted on while it still names the VM that holds it.
    """

    def __init__(self, base: int, count: int, directory: str = UID_DIR) -> None:
        if base < 1000 or count < 1:
            raise ValueError(f"need uid_base >= 1000 and uid_count >= 1, got {base}, {count}")
        self.base = base
        self.count = count
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        taken = host_accounts_in(range(base, base + count))
        if taken:
            raise ValueError(
                f"grading uids {base}..{base + count - 1} include host accounts "
                f"({', '.join(taken[:5])}): a job would run as them; choose another uid_base"
            )

    def claim(self, holder: str) -> int:
        for uid in range(self.base, self.base + self.count):
            claim = self.dir / str(uid)
            try:
                claim.mkdir(mode=0o700)
            except FileExistsError:
                continue
            (claim / "owner").write_text(f"{holder}\n")
            return uid
        raise LookupError(f"all {self.count} grading uids from {self.base} are in use")

    def holder(self, uid: int) -> str | None:
        try:
            return (self.dir / str(uid) / "owner").read_text().strip()
        except (OSError, ValueError):
            return None

    def holds(self, uid: int, holder: str) -> bool:
        """Whether ``uid``'s claim still names ``holder``."""
        return self.holder(uid) == holder

    def release(self, uid: int, holder: str) -> None:
        """Release ``uid`` if (and only if) ``holder`` holds it."""
        if self.holds(uid, holder):
            shutil.rmtree(self.dir / str(uid), ignore_errors=True)

    def claims(self, prefix: str) -> Iterator[tuple[int, str]]:
        """(uid, holder) of every claim whose holder starts with ``prefix``."""
        with contextlib.suppress(OSError):
            for entry in self.dir.iterdir():
                if not entry.name.isdigit():
                    continue
                holder = self.holder(int(entry.name))
                if holder is not None and holder.startswith(prefix):
                    yield int(entry.name), holder


def host_accounts_in(uids: range) -> list[str]:
    """Names of the host's accounts whose uid is in ``uids``."""
    try:
        return [f"{p.pw_name} ({p.pw_uid})" for p in pwd.getpwall() if p.pw_uid in uids]
    except OSError:
        return []


def pids_of_uid(uid: int) -> list[int]:
    """Every process on this host whose real, effective or saved uid is ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if str(uid) in line.split()[1:4]:
                            pids.append(int(entry.name))
                        break
        except OSError:
            continue
    return pids


# --------------------------------------------------------------------------
# The job's file systems in memory (tmpfs): how a VM's quota is shared

#: Kernel memory one file costs on a tmpfs (inode and dentry; measured ~950
#: bytes on Linux 6.x), charged like the file's pages to the memory cgroup.
INODE_BYTES = 1024

#: How a VM's quota is shared among the job's four file systems: they add up
#: to the whole, so that all of them full still leaves the VM's memory
#: headroom (see :func:`file_quotas`).
QUOTA_SHARES: Mapping[str, float] = {"home": 0.5, "tmp": 0.25, "var_tmp": 0.125, "shm": 0.125}

_PAGE = 4096


def file_quotas(memory: int, disk_quota: int, inode_quota: int) -> dict[str, tuple[int, int]]:
    """(bytes, inodes) for each of a job's tmpfs file systems (``QUOTA_SHARES`` keys).

    Files on a tmpfs are memory, charged to the VM's memory cgroup, and stay
    charged after the job's processes are killed: files that could fill the
    cgroup would leave nothing for the root processes that clean up (the OOM
    killer would take the autodriver, and the job's output with it, wherever
    ``oom_score_adj -1000`` cannot be set). So the job's files, all four file
    systems together, hold at most ``min(disk_quota, memory / 2)`` bytes and
    ``min(inode_quota, memory / 8 / INODE_BYTES)`` files: at most 5/8 of the
    memory, the rest is the job's processes' and the autodriver's. Each file
    system gets its share of both (at least 1 MiB and 64 files: tmpfs reads
    0 as "unlimited").
    """
    if memory <= 0 or disk_quota <= 0 or inode_quota <= 0:
        raise ValueError(f"need positive memory and quotas, got {memory}, {disk_quota}, "
                         f"{inode_quota}")
    total_bytes = min(disk_quota, memory // 2)
    total_inodes = min(inode_quota, memory // 8 // INODE_BYTES)
    return {
        role: (max(1 << 20, int(total_bytes * share) // _PAGE * _PAGE),
               max(64, int(total_inodes * share)))
        for role, share in QUOTA_SHARES.items()
    }
