"""Whether the manager that made a VM is still alive: the proof a start-up
reconciliation needs before it destroys anything (:meth:`vmpool.vmms.VMMS.getOrphans`).

Two proofs, one per place a VM's record lives:

- :class:`OwnerLock`, for state on this host (the local driver's sandboxes):
  an ``flock`` on ``<dir>/<owner>.lock`` that a live driver holds for its
  whole lifetime. The kernel drops it when the process ends, however it
  ends (SIGKILL included), so a lock anyone else can take is an owner whose
  process is gone. ``flock`` belongs to an open file description, not to a
  process: two drivers in one process do not share it.
- :func:`process_mark` / :func:`mark_is_dead`, for records kept elsewhere
  (a container's labels on an engine that may not be on this host): the
  identity of the process that made the VM (host, boot, pid namespace, pid,
  the process's start time, and a nonce per driver). A mark is proven dead
  only on the same host, boot and pid namespace: the pid is gone, or is
  another process now (its start time differs), or it is this very process
  and the driver that made the VM is closed. A mark from another host or
  namespace proves nothing, and its VMs are left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

# --------------------------------------------------------------------- flock


def _take(path: Path, *, create: bool) -> int | None:
    """An fd holding an exclusive flock on the file ``path`` names now, or
    None if someone else holds it (or there is no file and ``create`` is off).

    Whoever removes a lock file does so while holding it, so a lock taken on
    a file that was unlinked (or replaced) meanwhile proves nothing: the
    inode is compared with the path's after locking, and on a mismatch the
    file now at the path is tried.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    for _ in range(5):
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    return None


class OwnerLock:
    """An exclusive ``flock`` on ``path``, held while its owner lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock unless someone else holds it; True if held now."""
        if self._fd is None:
            self._fd = _take(self.path, create=True)
        return self._fd is not None

    def __del__(self) -> None:
        # a driver dropped without close (a failed constructor, a throwaway
        # in a test) is gone: so is its lock
        self.release()

    def release(self, *, remove: bool = False) -> None:
        """Let the lock go (and first remove its file, if ``remove``)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(fd)


@contextlib.contextmanager
def dead_owner(path: Path) -> Iterator[bool]:
    """Whether the owner of the lock file ``path`` is gone: if nobody holds
    it, yields True while holding it (the owner cannot come back meanwhile;
    the body may :func:`remove_lock_file` it), else False. A missing file
    proves nothing (False): whatever is there was not made by a driver that
    locks."""
    fd = _take(path, create=False)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def remove_lock_file(path: Path) -> None:
    """Remove a lock file that the caller holds (inside :func:`dead_owner`)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


# ---------------------------------------------------------- process marks

#: nonces of the drivers of this process that are alive (registered at
#: construction, dropped at close): a VM marked with this process's identity
#: and a nonce not here was made by a driver that is gone
_LIVE_NONCES: set[str] = set()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None if gone."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after it
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


@functools.cache
def _host() -> str:
    """This host (machine id and name), boot and pid namespace."""
    machine = _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id") or "-"
    boot = _read("/proc/sys/kernel/random/boot_id") or "-"
    try:
        pidns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pidns = "-"
    return f"{machine}.{socket.gethostname()}/{boot}/{pidns}"


def process_mark(nonce: str) -> str:
    """This process's identity and ``nonce`` (a live driver's), as one string:
    ``<machine>.<hostname>/<boot>/<pidns>/<pid>/<start>/<nonce>``."""
    pid = os.getpid()
    return f"{_host()}/{pid}/{_start_time(pid)}/{nonce}"


def register(nonce: str) -> None:
    """``nonce``'s driver is alive (until :func:`unregister`)."""
    _LIVE_NONCES.add(nonce)


def unregister(nonce: str) -> None:
    _LIVE_NONCES.discard(nonce)


def mark_is_dead(mark: str | None) -> bool:
    """Whether the process (and driver) that ``mark`` names is provably gone."""
    parts = (mark or "").split("/")
    if len(parts) != 6 or not parts[3].isdigit():
        return False
    machine, boot, pidns, pid_s, start, nonce = parts
    here_machine, here_boot, here_pidns = _host().split("/")
    if machine != here_machine:
        return False  # another host (or an unknown one): nothing is proven
    if boot != here_boot:
        return True  # this host rebooted since: every process of then is gone
    if pidns != here_pidns:
        return False  # its pids are not the ones /proc shows here
    pid = int(pid_s)
    if _start_time(pid) != start:
        return True  # the pid is gone, or is another process now
    if pid == os.getpid():
        return nonce not in _LIVE_NONCES
    return False


__all__ = [
    "OwnerLock",
    "dead_owner",
    "mark_is_dead",
    "process_mark",
    "register",
    "remove_lock_file",
    "unregister",
]
