"""The VMMS contract: what every driver implements.

The eight methods keep Tango's names and parameters; in vmpool each one is a
coroutine. A driver knows one VM at a time and nothing of pools, queues or
retries (that is policy, and policy lives in :mod:`vmpool.pool` and
:mod:`vmpool.scheduler`).

Failure is signalled by raising the typed errors of :mod:`vmpool.errors`,
never by a ``-1`` return value. Deadlines are enforced by the caller through
cancellation: a driver must tolerate being cancelled at any ``await`` and
must not shield long work from cancellation.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio.to_thread

from .config import KIB, MIB
from .errors import CopyOutError, UnsafePathError
from .models import InputFile, TangoMachine
from .output import copy_fd

log = logging.getLogger("vmpool.vmms")

#: Autodriver exit codes (Tango's).
EXIT_OK = 0
EXIT_USAGE = 1
EXIT_TIMEOUT = 2
EXIT_OSERROR = 3

#: the most of a driver's own (not spooled) feedback file copyOut copies
FEEDBACK_COPY_CAP = 64 * MIB
#: feedback bytes shorter than this are written by copyOut inline, not in a
#: worker thread (the thread hop costs more than the write)
INLINE_WRITE = 64 * KIB


@dataclass
class Feedback:
    """The autodriver's output of the last runJob, held on the host until copyOut.

    Exactly one of ``path`` and ``data`` is set:

    - ``path``: a file on the host. ``spooled=True``: the driver's own spool
      file, which copyOut moves to its destination (and which
      :meth:`VMMS.discard_feedback` deletes if it is never copied out);
      ``spooled=False``: a file the driver keeps (e.g. in the VM's
      sandbox), which copyOut copies, at most :data:`FEEDBACK_COPY_CAP` bytes.
    - ``data``: the feedback itself, in memory (the simulated driver).

    The contract: runJob sets ``vm.feedback`` (after discarding any earlier
    one) whenever it returns a status; ``copyOut(vm, destFile)`` takes it
    (``vm.feedback`` is None afterwards, whatever happens) and writes it to
    ``destFile``.
    """

    path: Path | None = None
    data: bytes | None = None
    spooled: bool = False

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("Feedback needs exactly one of path and data")
        if self.spooled and self.path is None:
            raise ValueError("only a file can be spooled")


class VMMS(abc.ABC):
    """A virtual machine management system.

    ``owner`` identifies the manager that created a VM: drivers attach it to
    every VM they create (label, tag, directory name) so that ``getVMs`` can
    find them again after a crash. Each manager has an owner of its own (a
    server keeps one across restarts), and VM names never collide between
    owners.

    Liveness: a driver holds, from before its first VM until :meth:`close`, a
    proof that its owner is alive (the local driver an ``flock`` on
    ``<state_dir>/<owner>.lock``; the Docker driver marks each container with
    its process's boot id, pid and start time). A manager's start-up
    reconciliation destroys only what :meth:`getOrphans` returns: VMs whose
    manager is provably gone, never a live one's — whoever it is.
    """

    #: name under which the driver is registered (entry point name)
    driver_name: ClassVar[str] = "abstract"
    #: the most cores and memory (MB) one VM may ask for (None: no limit
    #: known); a job asking more is refused when it is submitted
    max_cores: int | None = None
    max_memory_mb: int | None = None
    #: the memory (MB) of a VM whose TangoMachine names none (a driver
    #: option of the drivers that have VMs with memory)
    memory_mb: int = 1024
    #: whether :meth:`job_vm` makes VMs with a job's own credentials
    #: (Tango's ``accessKeyId``/``accessKey``); other drivers ignore them,
    #: as Tango's do
    job_owned_vms: ClassVar[bool] = False
    #: a server loads this driver when it starts and does not start if
    #: ``getImages`` fails (a wrong credential, region or image is a
    #: configuration error, named once, not a pool that retries in silence)
    checked_at_start: ClassVar[bool] = False

    def __init__(self, *, owner: str | None = None, prefix: str = "local") -> None:
        self.owner = owner or uuid.uuid4().hex[:12]
        self.prefix = prefix
        self._lost_watchers: list[Callable[[list[TangoMachine]], None]] = []
        self._room_watchers: list[Callable[[], None]] = []

    def instanceName(self, id: int | None, name: str) -> str:
        """Tango's instance name: ``<prefix>-<id>-<name>``."""
        return f"{self.prefix}-{id}-{name}"

    def memory_bytes(self, vm: TangoMachine) -> int:
        """The VM's memory in bytes: its own ``memory`` (MB), else the driver's ``memory_mb``."""
        return int((vm.memory or self.memory_mb) * MIB)

    async def getImages(self) -> list[str] | None:
        """The images this driver can start.

        None means "not known": any name may be tried, and initializeVM fails
        for one the driver cannot start. The default is None.
        """
        return None

    @abc.abstractmethod
    async def initializeVM(self, vm: TangoMachine) -> None:
        """Create the VM described by ``vm``; raise InitializeVMError on failure."""

    @abc.abstractmethod
    async def waitVM(self, vm: TangoMachine, max_secs: float) -> None:
        """Return once the VM can run jobs; raise VMNotReadyError if it cannot.

        The caller also bounds this call by ``max_secs`` through cancellation.
        """

    @abc.abstractmethod
    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        """Copy each ``localFile`` to ``destFile`` in the VM's job directory.

        The caller has checked every ``destFile`` with
        :func:`check_input_files` (the scheduler does, when the job is
        submitted): each names a file inside the job directory. Raises
        CopyInError on failure.
        """

    @abc.abstractmethod
    async def runJob(
        self,
        vm: TangoMachine,
        runTimeout: float,
        maxOutputFileSize: int,
        disableNetwork: bool,
    ) -> int:
        """Run the autodriver; return its exit code (0 ok, 1 usage, 2 timeout, 3 OS error).

        Starts with :meth:`discard_feedback`; whenever it returns a status it
        has set ``vm.feedback`` (a :class:`Feedback`: the autodriver's
        output, which copyOut writes out). Raises RunJobError when the
        autodriver could not be run at all.
        """

    async def copyOut(self, vm: TangoMachine, destFile: str) -> None:
        """Write the feedback of the last runJob to ``destFile`` on the host.

        Takes ``vm.feedback`` (None afterwards) and writes it: a spooled file
        is moved, another file copied (at most :data:`FEEDBACK_COPY_CAP`
        bytes), data written; file work is done in a worker thread, except
        for small data. Raises CopyOutError when there is no feedback or it
        cannot be written. Drivers override it only to add to it.
        """
        feedback, vm.feedback = vm.feedback, None
        if feedback is None:
            raise CopyOutError(
                f"VM {vm.instance_id or vm.id}: no feedback: runJob did not run")
        try:
            if feedback.data is not None:
                if len(feedback.data) < INLINE_WRITE:
                    _write_bytes(destFile, feedback.data)
                else:
                    await anyio.to_thread.run_sync(_write_bytes, destFile, feedback.data)
            elif feedback.spooled:
                assert feedback.path is not None
                await anyio.to_thread.run_sync(_move_file, feedback.path, destFile)
            else:
                assert feedback.path is not None
                await anyio.to_thread.run_sync(
                    _copy_capped, feedback.path, destFile, FEEDBACK_COPY_CAP)
        except OSError as e:
            raise CopyOutError(f"writing the feedback to {destFile}: {e.strerror or e}",
                               status=e.errno or -1) from e

    def discard_feedback(self, vm: TangoMachine) -> None:
        """Forget the VM's feedback, deleting a spooled file (runJob calls it
        first, destroyVM too: feedback never copied out leaves nothing)."""
        feedback, vm.feedback = vm.feedback, None
        if feedback is not None and feedback.spooled and feedback.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(feedback.path)

    def job_vm(self, spec: TangoMachine, access_key_id: str, access_key: str,
               ready_timeout: float) -> contextlib.AbstractAsyncContextManager[TangoMachine]:
        """A VM made for one job with the job's own credentials, ready to
        run it (within ``ready_timeout`` seconds), never pooled, destroyed
        when the block ends, whatever ends it. Only for drivers with
        :attr:`job_owned_vms`."""
        raise NotImplementedError(f"driver {self.driver_name} has no job-owned VMs")

    @abc.abstractmethod
    async def destroyVM(self, vm: TangoMachine) -> None:
        """Remove the VM (also one of another owner's, as getOrphans gave it)."""

    async def safeDestroyVM(self, vm: TangoMachine) -> None:
        """Remove the VM and make sure it is gone (raise DestroyVMError if not)."""
        await self.destroyVM(vm)

    @abc.abstractmethod
    async def getVMs(self) -> list[TangoMachine]:
        """Every VM this driver's owner has (used to find leaks and orphans)."""

    async def getOrphans(self) -> list[TangoMachine]:
        """VMs of this driver (any owner) whose manager is provably gone.

        That is: this owner's VMs that this driver instance did not make
        (left by an earlier process of the same owner, e.g. a restarted
        server, once the driver has shown that process to be gone), and other
        owners' VMs whose liveness proof is void (lock free, process gone).
        Never a VM of a live manager, this one included; when in doubt (no
        proof either way: another host, an unreadable record) a VM is not an
        orphan. Each VM returned can be passed to :meth:`destroyVM`.

        The default finds none (nothing is ever destroyed on a guess);
        drivers whose VMs outlive the process override it.
        """
        return []

    async def partialOutput(self, vm: TangoMachine) -> bytes | None:
        """What the job running on ``vm`` has printed so far (capped), if the
        driver can tell; None otherwise."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release the driver's own resources (connections, clients)."""

    async def background(self) -> None:  # noqa: B027 - optional hook, empty by default
        """The driver's own background work (e.g. reconnecting to hosts that
        went down), run by the manager in its task group for as long as it
        runs, cancelled at close. Whatever it raises is logged, never fatal.
        The default does nothing."""

    def usage(self) -> dict[str, dict[str, float]]:
        """For a driver whose VMs cost by the hour: per pool name, the
        instance-hours used so far (``running_hours``, ``stopped_hours``)
        and the instances now ``running`` and ``stopped``. Empty (the
        default) when the driver does not count them."""
        return {}

    def hosts(self) -> dict[str, dict[str, Any]]:
        """For a driver whose VMs live on several hosts: per host, its state
        (``up``, ``down``, ``draining``, ...), its VM count and room, its last
        error. Empty for a driver of one host (the default)."""
        return {}

    def drain_host(self, name: str, draining: bool = True) -> None:
        """Drain host ``name``: no new VMs there, running jobs finish, then
        its VMs go; ``draining=False`` puts it back. ValueError for a host
        the driver does not have (the default has none)."""
        raise ValueError(f"driver {self.driver_name} has no host {name!r}")

    def watch_lost(self, callback: Callable[[list[TangoMachine]], None]) -> Callable[[], None]:
        """Call ``callback(vms)`` when the driver knows VMs must take no
        other job: gone without a destroyVM (their host went down), or on a
        host being drained. Returns what stops the watch. Pools watch their
        driver: such an idle VM leaves the pool at once (destroyVM), a busy
        one when its job ends."""
        return _watch(self._lost_watchers, callback)

    def watch_room(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` when the driver may have room again after it
        raised NoRoomError (a host came back, or was put back); returns what
        stops the watch. Pools watch it: their jobs waiting for room get a
        VM now, not after the backoff."""
        return _watch(self._room_watchers, callback)

    def report_room(self) -> None:
        """Tell the watchers there may be room again (a driver calls it)."""
        self._notify(self._room_watchers, "room")

    def report_lost(self, vms: list[TangoMachine]) -> None:
        """Tell the watchers that ``vms`` must take no other job (a driver calls it)."""
        self._notify(self._lost_watchers, "lost-VM", vms)

    def _notify(self, watchers: list[Callable[..., None]], what: str, *args: Any) -> None:
        for callback in list(watchers):
            try:
                callback(*args)
            except Exception:
                log.exception("%s: a %s watcher failed", self.driver_name, what)


def _watch(watchers: list[Callable[..., None]],
           callback: Callable[..., None]) -> Callable[[], None]:
    """Add ``callback`` to ``watchers``; returns what takes it out again."""
    watchers.append(callback)

    def stop() -> None:
        with contextlib.suppress(ValueError):
            watchers.remove(callback)

    return stop


def _write_bytes(dest: str, data: bytes) -> None:
    with open(dest, "wb") as f:
        f.write(data)


def _move_file(src: Path, dest: str) -> None:
    """Move the spool file ``src`` to ``dest`` (a rename; across file systems
    a copy in the kernel, then removal); ``src`` is gone afterwards, whatever
    happens."""
    try:
        try:
            os.replace(src, dest)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        shutil.copyfile(src, dest)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(src)


def _copy_capped(src: Path, dest: str, cap: int) -> None:
    """Copy at most ``cap`` bytes of ``src`` to ``dest``, in the kernel."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        copy_fd(fin.fileno(), fout.fileno(), cap)


def format_seconds(t: float) -> str:
    """Seconds as Tango prints them: ``1`` for a whole number, else ``0.5``."""
    return str(int(t)) if float(t).is_integer() else f"{t:g}"


def add_memory_line(feedback: bytes, memory: int) -> bytes:
    """The feedback with ``Autodriver: memory limit of N bytes exceeded`` after
    its status line(s), for an OOM kill the driver saw and the autodriver did not."""
    line = f"Autodriver: memory limit of {memory} bytes exceeded\n".encode()
    if line in feedback:
        return feedback
    lines = feedback.split(b"\n", 2)
    n = 2 if len(lines) > 2 and lines[1].startswith(b"Autodriver: make was killed") else 1
    return b"\n".join(lines[:n]) + b"\n" + line + b"\n".join(lines[n:])


def safe_name(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_``
    (container names, directory names: an image ``course/lab`` names pools too)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return cleaned if cleaned[:1].isalnum() else f"x{cleaned}"


#: C0 controls and DEL: never in a name (a newline in a name ends up in an
#: HTTP header, a log line, a trace line or a Prometheus label)
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_dest_name(dest: str) -> str:
    """Validate a ``destFile`` name: relative, inside the job directory.

    Returns the normalised name or raises :class:`UnsafePathError` naming the
    problem. ``a/b`` is allowed (a subdirectory of the job), ``..``, absolute
    paths, empty names, NUL bytes and other control characters
    (\\x01-\\x1f, \\x7f) are not.
    """
    if not isinstance(dest, str) or dest == "":
        raise UnsafePathError("destFile is empty")
    if "\x00" in dest:
        raise UnsafePathError(f"destFile {dest!r} contains a NUL byte")
    bad = CONTROL_CHARS.search(dest)  # NUL was named above
    if bad is not None:
        raise UnsafePathError(
            f"destFile {dest!r} contains a control character ({bad.group()!r})")
    if dest.startswith("/") or dest.startswith("\\"):
        raise UnsafePathError(f"destFile {dest!r} is an absolute path")
    parts = dest.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"destFile {dest!r} contains '..'")
    norm = os.path.normpath(dest)
    if norm in (".", "") or norm.startswith(".."):
        raise UnsafePathError(f"destFile {dest!r} does not name a file in the job directory")
    return norm


def check_input_files(files: Sequence[InputFile]) -> None:
    """Validate every destFile; raise one UnsafePathError naming each bad one."""
    problems: list[str] = []
    for f in files:
        try:
            check_dest_name(f.destFile)
        except UnsafePathError as e:
            problems.extend(e.problems)
    if problems:
        raise UnsafePathError(problems)
