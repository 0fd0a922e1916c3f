"""Per-sandbox cgroups: v2 (unified) or the v1 ``pids``, ``memory`` and ``cpu`` hierarchies.

pids and memory are required; cpu is used when it can be (each sandbox then
gets an equal CPU share whatever its number of processes, and a quota when
its spec names cores).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupSupport:
    """Where sandbox cgroups go: one parent directory per hierarchy."""

    version: int
    #: controller name -> parent directory ("" for v2: one directory)
    parents: dict[str, Path]

    @property
    def cpu(self) -> bool:
        return "cpu" in self.parents or (self.version == 2 and self.cpu_v2)

    cpu_v2: bool = False

    def for_name(self, name: str) -> CgroupSet:
        return CgroupSet(self, {k: p / name for k, p in self.parents.items()})


def _writable_dir(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.W_OK)


def cgroup_support(root: Path = ROOT) -> CgroupSupport | None:
    """Find a writable cgroup file system with pids and memory (and cpu), or None."""
    controllers = root / "cgroup.controllers"
    if controllers.exists():
        have = controllers.read_text().split()
        if {"pids", "memory"} <= set(have):
            parent = root / "vmpool"
            try:
                parent.mkdir(exist_ok=True)
                # let the children of our parent use the controllers
                (root / "cgroup.subtree_control").write_text("+pids +memory")
                (parent / "cgroup.subtree_control").write_text("+pids +memory")
            except OSError:
                return None
            cpu = False
            if "cpu" in have:
                try:
                    (root / "cgroup.subtree_control").write_text("+cpu")
                    (parent / "cgroup.subtree_control").write_text("+cpu")
                    cpu = True
                except OSError:
                    pass
            return CgroupSupport(2, {"": parent}, cpu_v2=cpu)
        return None
    parents = {}
    for ctrl in ("pids", "memory", "cpu"):
        base = root / ctrl
        if not _writable_dir(base):
            if ctrl == "cpu":
                continue
            return None
        parent = base / "vmpool"
        try:
            parent.mkdir(exist_ok=True)
        except OSError:
            if ctrl == "cpu":
                continue
            return None
        parents[ctrl] = parent
    return CgroupSupport(1, parents)


@dataclass(frozen=True)
class CgroupSet:
    support: CgroupSupport
    dirs: dict[str, Path]

    def exists(self) -> bool:
        return all(d.is_dir() for d in self.dirs.values())

    def create(self, *, memory_bytes: int, pids_max: int, cores: float | None = None) -> None:
        """Make the cgroup(s) with these limits; ``cores`` caps the CPU time
        (a quota of that many CPUs); every sandbox has the same CPU share."""
        for d in self.dirs.values():
            d.mkdir(exist_ok=True)
        period = 100_000
        quota = int(cores * period) if cores else None
        if self.support.version == 2:
            d = self.dirs[""]
            _write(d / "pids.max", str(pids_max))
            _write(d / "memory.max", str(memory_bytes))
            _write(d / "memory.swap.max", "0", optional=True)
            if self.support.cpu_v2:
                _write(d / "cpu.weight", "100")
                _write(d / "cpu.max", f"{quota if quota else 'max'} {period}")
        else:
            if "cpu" in self.dirs:
                cpu = self.dirs["cpu"]
                _write(cpu / "cpu.shares", "1024")
                _write(cpu / "cpu.cfs_period_us", str(period))
                _write(cpu / "cpu.cfs_quota_us", str(quota if quota else -1))
            _write(self.dirs["pids"] / "pids.max", str(pids_max))
            mem = self.dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(memory_bytes))
            _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes), optional=True)

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return found

    def oom_kills(self) -> int:
        if self.support.version == 2:
            path = self.dirs[""] / "memory.events"
        else:
            path = self.dirs["memory"] / "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until none is left (bounded)."""
        if self.support.version == 2:
            _write(self.dirs[""] / "cgroup.kill", "1", optional=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)  # the kernel reaps asynchronously

    def remove(self) -> None:
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise
