"""A job's files on their way to a remote VM and its feedback on the way back.

Shared by the drivers whose VMs are reached over a stream (the Docker
driver's exec, the EC2 driver's SSH channel): copyIn writes the job's files
(and vmpool's autodriver) as ONE tar to a spool file; runJob sends that file
a chunk at a time into the one remote command that unpacks it and runs the
autodriver, whose stdout (the feedback) is written to a spool file as it
comes, capped, until copyOut moves it out. Neither the input nor a 64 MiB
feedback is ever held in memory.

The spool files live in a private (0700) directory of the driver's
(:class:`SpoolDir`), removed at close, or by a later driver if this one's
process died (its lock says so).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread

from vmpool.config import KIB
from vmpool.models import InputFile, TangoMachine
from vmpool.vmms import add_memory_line
from vmpool_drivers import liveness

#: a job's input tar and feedback go through files of this many bytes a write
SPOOL_CHUNK = 256 * KIB


class SpoolDir:
    """A driver's private directory (0700) for input tars and feedback,
    made on first use under ``root`` (its name starts with ``prefix``).
    Its lock, held until :meth:`remove`, tells a later driver whether the
    directory is a crashed process's (then it is removed)."""

    def __init__(self, root: str | Path | None, prefix: str) -> None:
        self.root = Path(root or tempfile.gettempdir())
        self.prefix = prefix
        self._dir: Path | None = None
        self._lock: liveness.OwnerLock | None = None
        self._guard = threading.Lock()

    @property
    def made(self) -> bool:
        return self._dir is not None

    def path(self) -> Path:
        """The directory, made now if need be (call it in a thread: it
        touches the disk; copyIns run in threads, several at once)."""
        with self._guard:
            if self._dir is None:
                self._sweep()
                d = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.root))
                lock = liveness.OwnerLock(d / ".lock")
                lock.acquire()
                self._dir, self._lock = d, lock
            return self._dir

    def _sweep(self) -> None:
        """Remove the spool directories of drivers whose process is gone."""
        with contextlib.suppress(OSError):
            for d in self.root.glob(f"{self.prefix}*"):
                if d.is_dir() and not d.is_symlink():
                    with liveness.dead_owner(d / ".lock") as dead:
                        if dead:
                            shutil.rmtree(d, ignore_errors=True)

    def remove(self) -> None:
        d, self._dir = self._dir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def input_tar(self, files: Sequence[InputFile], job_dir: str,
                  program: tuple[str, bytes] | None) -> str:
        """The tar of the job's files (and ``program``: the autodriver's path
        in the VM and its bytes), in a spool file: its path."""
        fd, path = tempfile.mkstemp(prefix="input-", suffix=".tar", dir=self.path())
        try:
            with os.fdopen(fd, "wb") as out:
                write_job_tar(out, files, job_dir, program)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return path

    def feedback(self, name: str, cap: int) -> Spool:
        """A new spool file for a job's feedback, capped at ``cap`` bytes."""
        return Spool(self.path() / name, cap)


def write_job_tar(out: BinaryIO, files: Sequence[InputFile], job_dir: str,
                  program: tuple[str, bytes] | None) -> None:
    """Write the tar: ``program`` (path relative to /, mode 0755) and each
    file under ``job_dir`` (relative to /) at its checked ``destFile``."""
    now = time.time()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if program is not None:
            name, code = program
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(code), 0o755, now
            tar.addfile(info, io.BytesIO(code))
        for f in files:
            dest = f"{job_dir}/{os.path.normpath(f.destFile)}"
            with open(f.localFile, "rb") as data:
                size = os.fstat(data.fileno()).st_size
                info = tarfile.TarInfo(dest)
                info.size, info.mode, info.mtime = size, 0o644, now
                tar.addfile(info, data)  # copied in chunks, never whole


def drop_spooled(vm: TangoMachine, key: str) -> None:
    """Forget (and remove) the VM's spool file ``driver_data[key]``, if any."""
    path = vm.driver_data.pop(key, None)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


class Spool:
    """A remote command's stdout, written to ``path`` as it comes and capped
    at ``cap`` bytes: at most one chunk of it in memory, every write in a
    thread."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.size = 0
        #: bytes that came past the cap (read and dropped)
        self.dropped = 0
        self._buf = bytearray()
        self._file: BinaryIO | None = None

    async def write(self, data: bytes) -> None:
        room = self.cap - self.size
        if room <= 0:
            # past the cap: read (the sender must not block) and dropped
            self.dropped += len(data)
            return
        chunk = data[:room]
        self.dropped += len(data) - len(chunk)
        self._buf += chunk
        self.size += len(chunk)
        if len(self._buf) >= SPOOL_CHUNK:
            buf, self._buf = self._buf, bytearray()
            await anyio.to_thread.run_sync(self._write, buf)

    async def finish(self) -> None:
        """Write what is left and close the file (made even when empty)."""
        buf, self._buf = self._buf, bytearray()
        await anyio.to_thread.run_sync(self._finish, buf)

    def _write(self, buf: bytes | bytearray) -> None:
        if self._file is None:
            # created here, owner-only (the spool directory is, too)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "wb")
        self._file.write(buf)

    def _finish(self, buf: bytes | bytearray) -> None:
        self._write(buf)
        assert self._file is not None
        self._file.close()
        self._file = None

    def discard(self) -> None:
        """Close and remove the file (a job cut short or failed)."""
        self._buf = bytearray()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def send_file(write: Callable[[bytes], Awaitable[None]], path: Path) -> None:
    """Send the file at ``path`` through ``write`` a chunk at a time (each
    write waits until the receiver has taken the one before)."""
    f = await anyio.to_thread.run_sync(open, path, "rb")
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(f.read, SPOOL_CHUNK)
            if chunk:
                await write(chunk)
            if len(chunk) < SPOOL_CHUNK:
                return
    finally:
        f.close()


def add_memory_line_to(path: Path, memory: int) -> None:
    """:func:`~vmpool.vmms.add_memory_line` for a feedback file: its head is
    rewritten, the rest copied after it."""
    with open(path, "rb") as f:
        head = f.read(64 * KIB)
        new = add_memory_line(head, memory)
        if new == head:
            return
        tmp = path.with_name(path.name + ".m")
        with open(tmp, "wb") as out:
            out.write(new)
            shutil.copyfileobj(f, out, SPOOL_CHUNK)
    os.replace(tmp, path)
