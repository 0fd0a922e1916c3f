#!/usr/bin/env python3
"""vmpool autodriver: run ``make`` for one grading job, under limits.

This file is copied into every VM, sandbox or container and run there as
``python3 autodriver.py [options] DIRECTORY``.  It must stay one file, use the
standard library only and run on any python3 >= 3.8 (grading images carry old
Pythons), so no ``match``, no runtime ``X | Y`` types, no 3.9+ APIs.

Command line (compatible with Tango's C autodriver)::

    autodriver [-u nproc] [-f fsize] [-t timeout] [-o osize]
               [--mem BYTES] [--cpu SECONDS] [--user NAME] [--output FILE]
               [--env NAME=VALUE]... [--quota] [--no-seccomp]
               [--no-cleanup] [--no-cgroup] DIRECTORY

0 means unlimited for every limit.  Exit codes: 0 the job finished (whatever
``make`` returned), 1 usage error, 2 timeout, 3 OS error (fork/exec failed,
processes could not be killed, the autodriver itself was signalled, the
feedback could not be written).  Every message of ours is one line
``Autodriver: <msg>``.

What it does, in order:

1. Checks the grading user (``--user``, default ``autograde``): it must exist
   and not be uid 0.  Running as root, the job runs as that user; running as
   the grading user itself, the job runs without switching; anything else is a
   usage error.
2. As root: ``lchown``s DIRECTORY and everything in it to the grading user
   (never following symlinks, never leaving the file system, skipping files
   with several hard links so a planted link cannot hand a system file over).
3. Forks ``make`` in DIRECTORY in a new session with stdin ``/dev/null``,
   stdout and stderr on one pipe, no other inherited file descriptor,
   RLIMIT_NPROC/FSIZE/CPU/CORE (and the memory limit, below) set,
   supplementary groups dropped and real, effective and saved uid/gid set to
   the grading user before ``exec``, then ``PR_SET_NO_NEW_PRIVS`` and a
   seccomp filter (no new namespaces, no kernel keyring, no file handles, no
   mounts, bpf, userfaultfd, perf_event_open or io_uring; ``--no-seccomp``
   leaves the filter out), ``oom_score_adj`` 1000 (the autodriver sets its
   own to -1000: a job filling memory is killed, its output kept).  The
   environment is built from scratch, never passed on: ``PATH`` (the
   autodriver's), ``HOME``, ``USER`` and ``LOGNAME`` naming the grading user,
   ``LANG``/``LC_ALL`` ``C.UTF-8``, ``TERM=dumb``, and what the image or pool
   declares with ``--env NAME=VALUE`` (e.g. ``JAVA_HOME``).
4. Reads the pipe in large chunks, keeping only the first osize/2 and a
   rolling last osize/2 bytes (the output is capped while it is produced,
   memory stays bounded, nothing is written to disk).
5. When ``make`` exits, or the timeout expires, or the autodriver gets
   SIGTERM/SIGINT/SIGHUP, kills every process of the job (see below), with
   ``--quota`` says which of the job's file systems (job directory, /tmp,
   /var/tmp, /dev/shm) it filled (``disk quota of N bytes exceeded``,
   ``inode quota of N files exceeded``), removes the grading user's files,
   reads what is left in the pipe and prints the
   feedback: status line(s) first, then the (capped) output.  Autolab reads
   the scores from the LAST line of the feedback, so all our lines come
   before the job's output, never after it.

Status lines: ``Job exited with status N`` (make's exit status; if make
itself was killed by signal S, N = 128+S and a second line ``make was killed
by signal S (NAME)`` -- Tango printed WEXITSTATUS, i.e. 0, for a killed make),
``Job timed out after N seconds`` (exit 2), ``Job interrupted: autodriver
received SIGTERM`` (exit 3: the job did not run to its end through no fault
of its own, so the VM is treated as broken and the job retried), then
optionally ``memory limit of N bytes exceeded`` and ``Gave up killing user
processes`` (exit 3).

Process tracking and killing.  The grading uid is dedicated to the job, so as
root "the job" is every process whose real, effective or saved uid is the
grading uid, wherever it is in the process tree (setsid, double fork and
daemons cannot leave a uid).  The kill forks a helper that drops to the
grading uid and calls ``kill(-1, SIGKILL)``: the kernel signals every process
that uid may signal while holding the task list lock, so even a fork bomb
cannot outrun it.  This is repeated, with a /proc scan after each round, until
no such process is left (bounded, ~3 s); then remaining pids are killed
directly; if some still survive: ``Gave up killing user processes``, exit 3.
The autodriver also makes itself a child subreaper, so orphans of the job are
re-parented to it and reaped (and, when running as the grading user without
root, the job is "every descendant of the autodriver").  When a writable
cgroup (v2, or v1 for memory) is available the job is also put in its own
cgroup, which is killed and scanned as well.

Memory (``--mem``).  If a cgroup with the memory controller can be used, the
whole job gets ``memory.max`` (v2) / ``memory.limit_in_bytes`` (v1), swap 0,
and an OOM kill is read from the cgroup's counters (no RLIMIT_AS then).
Otherwise every process gets RLIMIT_AS = mem; an allocation beyond it fails,
and the failure is recognised in the output (``MemoryError``,
``std::bad_alloc``, ``Cannot allocate memory`` ...) when the job failed.
Either way the feedback then has the line
``Autodriver: memory limit of N bytes exceeded``.  Note RLIMIT_AS counts
address space, not memory in use: JVMs and Go programs reserve a lot, so give
them a generous limit when no cgroup is available.

Cleanup.  As root, after every process is gone, files owned by the grading
uid are removed from DIRECTORY (the directory itself stays), /tmp, /var/tmp
and /dev/shm: symlinks are removed, never followed; each tree is walked with
directory fds, on its own file system only.  The ``--output`` file is never
removed nor given to the grading user; if the job (which may own the
directory holding it) removed, renamed or replaced it, a fresh one is
created in the same directory, through the directory fd opened at the start,
so the feedback cannot be forged.  Running as the grading user without root
nothing is deleted: the autodriver cannot tell the job's files from its
caller's own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import pwd
import resource
import select
import signal
import stat
import sys
import time

# os.execvpe imports warnings lazily, in the child, after the switch to the grading
# user, who may not be able to read the interpreter's library: import it here.
import warnings  # noqa: F401
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import argparse

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_TIMEOUT = 2
EXIT_OSERROR = 3

HEADER = "Autodriver: "
ELISION = b"\n...[excess bytes elided]...\n"  # exactly Tango's marker
DEFAULT_USER = "autograde"
READ_CHUNK = 1 << 20  # read the job's pipe in chunks of up to 1 MiB
PIPE_SIZE = 1 << 20  # and ask for a 1 MiB pipe buffer, so each read gets a lot
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ only exists from Python 3.10
PR_SET_CHILD_SUBREAPER = 36
SPOOL_MEMORY = 8 << 20  # unlimited output (-o 0): spill to an unlinked file past 8 MiB
KILL_SECONDS = 3.0  # how long to keep killing before giving up
MAX_TREE_DEPTH = 512  # deepest directory level chown/cleanup descend to
CLEAN_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "GNUMAKEFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
# Directories that are never acceptable as a job directory when running as
# root: the job directory is chowned to the grading user and emptied.
FORBIDDEN_DIRS = frozenset(
    (
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/var",
        "/var/tmp",
        "/dev/shm",
    )
)
# How programs report a failed allocation (recognised only with --mem).
OOM_PATTERNS = (
    b"MemoryError",
    b"Cannot allocate memory",
    b"cannot allocate memory",
    b"std::bad_alloc",
    b"OutOfMemoryError",
    b"out of memory",
    b"Out of memory",
    b"memory exhausted",
)


class UsageError(Exception):
    """Bad command line or environment: ``Autodriver: <msg>``, exit 1."""


class OSFailure(Exception):
    """The autodriver could not do its job: ``Autodriver: <msg>``, exit 3."""


# --------------------------------------------------------------------------
# Command line


class _BadValue(ValueError):
    """A bad option value; argparse reports it with this message."""


_UNITS = (
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("kb", 10**3),
    ("mb", 10**6),
    ("gb", 10**9),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("b", 1),
)


def parse_size(text: str) -> int:
    """Bytes: ``1048576``, ``100MB`` (10**6), ``100M`` / ``100MiB`` (2**20)."""
    low = text.strip().lower()
    mult = 1
    for suffix, factor in _UNITS:
        if low.endswith(suffix):
            low, mult = low[: -len(suffix)].strip(), factor
            break
    try:
        value = int(low)
    except ValueError:
        raise _BadValue(f"invalid size {text!r}") from None
    if value < 0:
        raise _BadValue(f"invalid size {text!r}: must not be negative")
    return value * mult


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _BadValue(f"invalid number {text!r}") from None
    if value < 0:
        raise _BadValue(f"invalid number {text!r}: must not be negative")
    return value


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _BadValue(f"invalid time {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise _BadValue(f"invalid time {text!r}: must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    # argparse costs ~15 ms to import in a grading image's Python, a tenth of
    # a warm job: main() uses it only for --help and to word usage errors.
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise UsageError(message)

    def typed(fn: Callable[[str], Any]) -> Callable[[str], Any]:
        def convert(text: str) -> Any:
            try:
                return fn(text)
            except _BadValue as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        convert.__name__ = fn.__name__
        return convert

    p = _Parser(
        prog="autodriver",
        description="Run `make` in DIRECTORY as the grading user, under limits. 0 = unlimited.",
    )
    p.add_argument(
        "-u",
        "--nproc",
        type=typed(parse_count),
        default=0,
        metavar="NPROC",
        help="limit on the grading user's processes (RLIMIT_NPROC)",
    )
    p.add_argument(
        "-f",
        "--fsize",
        type=typed(parse_size),
        default=0,
        metavar="BYTES",
        help="largest file the job may write (RLIMIT_FSIZE)",
    )
    p.add_argument(
        "-t",
        "--timeout",
        type=typed(parse_seconds),
        default=0.0,
        metavar="SECONDS",
        help="wall-clock limit for the whole job",
    )
    p.add_argument(
        "-o",
        "--osize",
        type=typed(parse_size),
        default=0,
        metavar="BYTES",
        help="output cap: first and last BYTES/2 are kept",
    )
    p.add_argument(
        "--mem",
        type=typed(parse_size),
        default=0,
        metavar="BYTES",
        help="memory limit (cgroup if available, else RLIMIT_AS per process)",
    )
    p.add_argument(
        "--cpu",
        type=typed(parse_count),
        default=0,
        metavar="SECONDS",
        help="CPU time limit per process (RLIMIT_CPU)",
    )
    p.add_argument(
        "--user",
        default=DEFAULT_USER,
        metavar="NAME",
        help=f"grading user (default {DEFAULT_USER}), or #UID for a uid without a passwd entry",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="write the feedback to FILE instead of standard output",
    )
    p.add_argument(
        "--partial",
        default=None,
        metavar="FILE",
        help="while the job runs, keep FILE updated (atomically, at most twice a second) "
        "with the output so far, capped as the feedback is",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="add NAME=VALUE to the job's environment (repeatable); the job gets only "
        "PATH, HOME, USER, LOGNAME, LANG, LC_ALL, TERM=dumb and these",
    )
    p.add_argument(
        "--quota",
        action="store_true",
        help="the job directory, /tmp, /var/tmp and /dev/shm are the job's quota: "
        "say so when one is full",
    )
    p.add_argument(
        "--no-seccomp",
        action="store_true",
        help="do not install the seccomp filter (no_new_privs is set anyway)",
    )
    p.add_argument(
        "--no-cleanup",
        action="store_true",
        help="keep the grading user's files (processes are killed anyway)",
    )
    p.add_argument(
        "--no-cgroup", action="store_true", help="do not use cgroups, only rlimits and the uid"
    )
    p.add_argument("directory", metavar="DIRECTORY", help="job directory holding the Makefile")
    return p


def format_seconds(value: float) -> str:
    """Tango prints whole seconds with %d; keep that, show fractions if given."""
    if value == int(value):
        return str(int(value))
    return format(value, "g")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------
# Output capture


#: seconds between two --partial snapshots, and the most a snapshot holds
PARTIAL_EVERY = 0.5
PARTIAL_MAX = 16 * 1024


class Capture:
    """The job's output, capped while it is produced.

    With a cap, at most ``limit`` bytes (plus one read chunk) are ever held:
    everything while the total is within the cap, then the first ``limit//2``
    bytes and a rolling window of the last ``limit//2`` bytes.  Without a cap
    (0) the output is spooled, to an unlinked temporary file past 8 MiB.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.half = limit // 2
        self.total = 0
        self.elided = False
        self.head = bytearray()
        self.tail = bytearray()
        self.spool: IO[bytes] | None = None
        if limit == 0:
            import tempfile  # only for unlimited output: not worth its import time otherwise

            self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self.spool is not None:
            self.spool.write(data)
        elif self.elided:
            self._push_tail(data)
        elif self.total <= self.limit:
            self.head += data
        else:
            keep = self.half - len(self.head)
            if keep < 0:
                rest = self.head[self.half :]
                del self.head[self.half :]
                self._push_tail(bytes(rest))
                self._push_tail(data)
            else:
                self.head += data[:keep]
                self._push_tail(data[keep:])
            self.elided = True

    def _push_tail(self, data: bytes) -> None:
        if self.half == 0:
            return
        if len(data) >= self.half:
            self.tail = bytearray(data[len(data) - self.half :])
            return
        self.tail += data
        excess = len(self.tail) - self.half
        if excess > 0:
            del self.tail[:excess]

    def chunks(self) -> Iterator[bytes]:
        """The feedback body: everything, or head + Tango's marker + tail."""
        if self.spool is not None:
            self.spool.seek(0)
            while True:
                block = self.spool.read(READ_CHUNK)
                if not block:
                    return
                yield block
        yield bytes(self.head)
        if self.elided:
            yield ELISION
            yield bytes(self.tail)

    def sample(self) -> list[bytes]:
        """Bounded pieces of the output, to look for allocation failures in."""
        if self.spool is None:
            return [bytes(self.head), bytes(self.tail)]
        pieces = []
        self.spool.seek(0)
        pieces.append(self.spool.read(READ_CHUNK))
        if self.total > READ_CHUNK:
            self.spool.seek(max(READ_CHUNK, self.total - READ_CHUNK))
            pieces.append(self.spool.read(READ_CHUNK))
        return pieces

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


# --------------------------------------------------------------------------
# /proc


class Proc:
    __slots__ = ("pid", "ppid", "state", "uids")

    def __init__(self, pid: int, ppid: int, state: str, uids: tuple[int, ...]) -> None:
        self.pid = pid
        self.ppid = ppid
        self.state = state
        self.uids = uids

    @property
    def alive(self) -> bool:
        """Zombies (Z) and dead tasks (X) hold no resources and run nothing."""
        return self.state not in ("Z", "X")


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    state = "?"
    ppid = 0
    uids: tuple[int, ...] = ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "State":
            state = value.strip()[:1]
        elif key == "PPid":
            ppid = int(value.split()[0])
        elif key == "Uid":
            uids = tuple(int(v) for v in value.split()[:3])  # real, effective, saved
    return Proc(pid, ppid, state, uids)


def all_procs() -> list[Proc]:
    procs = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if name.isdigit():
            proc = read_proc(int(name))
            if proc is not None:
                procs.append(proc)
    return procs


def set_child_subreaper() -> bool:
    """Orphans of the job become our children (not init's): we see and reap them."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except Exception:
        return False


# --------------------------------------------------------------------------
# What the job may not ask of the kernel (a seccomp filter, installed in the
# job's process after the switch to the grading user, with no_new_privs)
#
# Refused, as Docker's default profile does for an unprivileged container:
# new namespaces (unshare, setns, clone with a CLONE_NEW* flag; clone3 answers
# ENOSYS so that libc falls back to clone), the kernel keyring (keyctl,
# add_key, request_key: keys outlive the job and its uid), file handles
# (open_by_handle_at, name_to_handle_at), mounts, bpf, userfaultfd,
# perf_event_open and io_uring.  Any other architecture's system calls (e.g.
# i386 through int 0x80) are refused too: they would bypass the numbers below.

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_X32_BIT = 0x40000000
# machine -> (AUDIT_ARCH_*, clone, clone3, {syscall: errno})
_EPERM, _ENOSYS = errno.EPERM, errno.ENOSYS
_SYSCALLS = {
    "x86_64": (0xC000003E, 56, 435, {
        272: _EPERM, 308: _EPERM,  # unshare, setns
        248: _EPERM, 249: _EPERM, 250: _EPERM,  # add_key, request_key, keyctl
        303: _EPERM, 304: _EPERM,  # name_to_handle_at, open_by_handle_at
        165: _EPERM, 166: _EPERM, 155: _EPERM,  # mount, umount2, pivot_root
        321: _EPERM, 323: _EPERM, 298: _EPERM,  # bpf, userfaultfd, perf_event_open
    }),
    "aarch64": (0xC00000B7, 220, 435, {
        97: _EPERM, 268: _EPERM,
        217: _EPERM, 218: _EPERM, 219: _EPERM,
        264: _EPERM, 265: _EPERM,
        40: _EPERM, 39: _EPERM, 41: _EPERM,
        280: _EPERM, 282: _EPERM, 241: _EPERM,
    }),
}
# the same numbers on every architecture: io_uring_*, open_tree .. fspick, mount_setattr
_COMMON = {425: _ENOSYS, 426: _ENOSYS, 427: _ENOSYS, 428: _EPERM, 429: _EPERM, 430: _EPERM,
           431: _EPERM, 432: _EPERM, 433: _EPERM, 442: _EPERM}


def seccomp_program(machine: str | None = None) -> bytes:
    """The job's filter as classic BPF (``struct sock_filter[]``) for ``machine``."""
    import struct

    if machine is None:
        machine = os.uname().machine
    if machine not in _SYSCALLS:
        raise OSFailure(
            f"no seccomp filter for the {machine} architecture (run with --no-seccomp "
            "to go without one)"
        )
    arch, clone, clone3, refused = _SYSCALLS[machine]
    refused = dict(refused)
    refused.update(_COMMON)
    refused[clone3] = _ENOSYS
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [
        (ld, 0, 0, 4),  # arch
        (jeq, 1, 0, arch),
        (ret, 0, 0, _RET_ERRNO | _ENOSYS),
        (ld, 0, 0, 0),  # nr
    ]
    if machine == "x86_64":
        prog += [(jge, 0, 1, _X32_BIT), (ret, 0, 0, _RET_ERRNO | _ENOSYS)]
    for nr, err in sorted(refused.items()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, _RET_ERRNO | err)]
    prog += [
        (jeq, 0, 3, clone),
        (ld, 0, 0, 16),  # the low half of clone's flags
        (jset, 0, 1, _CLONE_NEW_FLAGS),
        (ret, 0, 0, _RET_ERRNO | _EPERM),
        (ret, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


def restrict_kernel(program: bytes | None) -> None:
    """no_new_privs, then the filter (if any), for this process and its children."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if program is None:
        return

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = _Prog(len(program) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")


def set_oom_score_adj(value: int) -> bool:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# cgroups (best effort: used when writable, never required)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroup:
    def __init__(self, path: str, version: int) -> None:
        self.path = path
        self.version = version
        self.memory = False  # the memory limit is enforced here

    def join(self, pid: int) -> None:
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> None:
        if self.version == 2:
            try:
                _write(os.path.join(self.path, "cgroup.kill"), "1")  # Linux >= 5.14
                return
            except OSError:
                pass
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def set_memory(self, limit: int) -> bool:
        try:
            if self.version == 2:
                _write(os.path.join(self.path, "memory.max"), str(limit))
                for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    with contextlib.suppress(OSError):
                        _write(os.path.join(self.path, name), value)
            else:
                _write(os.path.join(self.path, "memory.limit_in_bytes"), str(limit))
                # memory+swap = memory: no swapping (only with swap accounting)
                with contextlib.suppress(OSError):
                    _write(os.path.join(self.path, "memory.memsw.limit_in_bytes"), str(limit))
        except OSError:
            return False
        self.memory = True
        return True

    def oom_killed(self) -> bool | None:
        """True/False from the OOM kill counter; None if the kernel has none."""
        if not self.memory:
            return False
        counters: dict[str, int] = {}
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in _read(os.path.join(self.path, name)).splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    counters[parts[0]] = int(parts[1])
        except OSError:
            return False
        if "oom_kill" in counters:
            return counters["oom_kill"] > 0 or counters.get("oom_group_kill", 0) > 0
        return None

    def limit_hit(self) -> bool:
        """v1: the usage reached the limit at least once (a hint, not an OOM kill)."""
        if self.version != 1:
            return False  # v2 always has the oom_kill counter
        try:
            return _read(os.path.join(self.path, "memory.failcnt")).strip() not in ("", "0")
        except OSError:
            return False

    def remove(self) -> None:
        deadline = time.monotonic() + 1.0
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.01)


def _cgroup_dirs() -> tuple[str | None, str | None]:
    """Our own cgroup's directory: (cgroup v2, cgroup v1 memory controller).

    The job's cgroup is made inside our own, never elsewhere in the tree, so
    the limits the VM or container put on us still apply to the job.
    """
    own: dict[str, str] = {}
    try:
        for line in _read("/proc/self/cgroup").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                own["cgroup2"] = parts[2]
            for ctrl in parts[1].split(","):
                if ctrl:
                    own[ctrl] = parts[2]
        mounts = _read("/proc/self/mountinfo").splitlines()
    except OSError:
        return None, None
    found: dict[str, str] = {}
    for line in mounts:
        left, sep, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rfields) < 3:
            continue
        root, mountpoint, fstype = fields[3], fields[4], rfields[0]
        if fstype == "cgroup2":
            key = "cgroup2"
        elif fstype == "cgroup" and "memory" in rfields[2].split(","):
            key = "memory"
        else:
            continue
        path = own.get(key)
        if key in found or path is None:
            continue
        if root != "/":  # a bind mount of part of the hierarchy
            if path != root and not path.startswith(root.rstrip("/") + "/"):
                continue
            path = path[len(root) :]
        found[key] = os.path.normpath(mountpoint + "/" + path)
    return found.get("cgroup2"), found.get("memory")


def setup_cgroups(mem: int) -> list[Cgroup]:
    """Make the job's cgroup(s); [] if none can be made (then rlimits do it all)."""
    name = f"vmpool-autodriver-{os.getpid()}"
    v2_parent, v1_parent = _cgroup_dirs()
    groups: list[Cgroup] = []
    v2: Cgroup | None = None
    if v2_parent is not None:
        try:
            os.mkdir(os.path.join(v2_parent, name), 0o755)
            v2 = Cgroup(os.path.join(v2_parent, name), 2)
            groups.append(v2)
        except OSError:
            pass
    if mem and v2 is not None and _has_word(os.path.join(v2.path, "cgroup.controllers"), "memory"):
        v2.set_memory(mem)
    if mem and (v2 is None or not v2.memory) and v1_parent is not None:
        try:
            os.mkdir(os.path.join(v1_parent, name), 0o755)
        except OSError:
            return groups
        v1 = Cgroup(os.path.join(v1_parent, name), 1)
        if v1.set_memory(mem):
            groups.append(v1)
        else:
            v1.remove()
    return groups


def _has_word(path: str, word: str) -> bool:
    try:
        return word in _read(path).split()
    except OSError:
        return False


# --------------------------------------------------------------------------
# Directory trees (chown and cleanup), never following symlinks


class _Frame:
    __slots__ = ("entry", "fd", "names")

    def __init__(self, fd: int, names: list[str], entry: tuple[str, os.stat_result] | None):
        self.fd = fd
        self.names = names
        self.entry = entry


def walk_tree(top: str) -> Iterator[tuple[int, str, os.stat_result]]:
    """Yield ``(dir_fd, name, lstat)`` for everything under ``top``, children first.

    Symlinks are reported, never followed; other file systems are not entered
    (nor reported); directories are opened with O_NOFOLLOW relative to their
    parent's fd, so a renamed or replaced path cannot redirect the walk.
    """
    try:
        top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    frames: list[_Frame] = []
    try:
        dev = os.fstat(top_fd).st_dev
        frames.append(_Frame(top_fd, _listdir(top_fd), None))
        while frames:
            frame = frames[-1]
            if not frame.names:
                frames.pop()
                os.close(frame.fd)
                if frame.entry is not None and frames:
                    yield frames[-1].fd, frame.entry[0], frame.entry[1]
                continue
            name = frame.names.pop()
            try:
                st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != dev:
                continue
            if stat.S_ISDIR(st.st_mode) and len(frames) < MAX_TREE_DEPTH:
                try:
                    fd = os.open(
                        name,
                        os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=frame.fd,
                    )
                except OSError:
                    yield frame.fd, name, st
                    continue
                frames.append(_Frame(fd, _listdir(fd), (name, st)))
                continue
            yield frame.fd, name, st
    finally:
        for frame in frames:
            os.close(frame.fd)


def _listdir(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError:
        return []


def chown_tree(top: str, uid: int, gid: int, skip: set[tuple[int, int]]) -> None:
    """lchown everything under ``top`` (not ``top`` itself) except ``skip``."""
    for dir_fd, name, st in walk_tree(top):
        if (st.st_dev, st.st_ino) in skip:
            continue
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            continue  # a hard link may be a system file: do not give it away
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def remove_owned(top: str, uid: int, keep: set[tuple[int, int]]) -> int:
    """Remove what ``uid`` owns under ``top`` (not ``top``); return how many failed."""
    failed = 0
    for dir_fd, name, st in walk_tree(top):
        if st.st_uid != uid or (st.st_dev, st.st_ino) in keep:
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                failed += 1  # (a directory still holding others' files is fine)
    return failed


# --------------------------------------------------------------------------
# The driver


class Autodriver:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.nproc: int = opts.nproc
        self.fsize: int = opts.fsize
        self.timeout: float = opts.timeout
        self.osize: int = opts.osize
        self.mem: int = opts.mem
        self.cpu: int = opts.cpu
        self.out_fd = 1
        self.output_dir_fd = -1
        self.output_name = ""
        self.output_id = (-1, -1)
        self.keep: set[tuple[int, int]] = set()  # (dev, ino) never chowned nor removed
        self.switch = False  # running as root: the job runs as the grading user
        self.uid = self.gid = -1
        self.user = ""
        self.home = ""
        self.directory = ""
        self.cgroups: list[Cgroup] = []
        self.subreaper = False
        self.make_pid = -1
        self.make_status: int | None = None
        self.interrupted = 0
        self.timed_out = False
        self.partial_due = 0.0
        self.partial_dirty = False
        self.wake_r = self.wake_w = -1

    # -- setup ------------------------------------------------------------

    def open_output(self) -> None:
        path = self.opts.output
        if path is None:
            return
        # The file is opened relative to its directory, kept open, so it can
        # be checked (and recreated) there at the end without following any
        # path the job could have changed meanwhile.
        parent, self.output_name = os.path.split(os.path.abspath(path))
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.output_dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fd = os.open(self.output_name, flags, 0o644, dir_fd=self.output_dir_fd)
        except OSError as exc:
            raise UsageError(f"cannot open output file {path}: {exc.strerror}") from None
        st = os.fstat(fd)
        self.output_id = (st.st_dev, st.st_ino)
        self.keep.add(self.output_id)
        self.out_fd = fd

    def reclaim_output(self) -> None:
        """If the job removed, renamed or replaced the feedback file (it may own
        the directory), put a fresh one back.  Every job process is dead by now,
        and all is done relative to the directory fd opened at the start."""
        if self.output_dir_fd < 0:
            return
        name, dir_fd = self.output_name, self.output_dir_fd
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == self.output_id:
            return
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        os.close(self.out_fd)
        self.out_fd = fd

    def check(self) -> None:
        user = self.opts.user
        if user.startswith("#") and user[1:].isdigit():
            # "#UID": a uid with no passwd entry (a sandbox host hands each
            # job its own uid without creating users); gid = uid.
            uid = int(user[1:])
            if uid == 0:
                raise UsageError("refusing to run the job as root (uid 0)")
            self.uid, self.gid, self.user = uid, uid, "autograde"
            self.home = os.path.realpath(self.opts.directory)
        else:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise UsageError(f"grading user {user} does not exist") from None
            if pw.pw_uid == 0:
                raise UsageError(
                    f"refusing to run the job as root (user {pw.pw_name} has uid 0)"
                )
            self.uid, self.gid, self.user, self.home = (
                pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir
            )
        if os.geteuid() == 0:
            self.switch = True
        elif os.getuid() != self.uid or os.geteuid() != self.uid:
            raise UsageError(
                f"must run as root or as the grading user {self.user}"
                f" (running as uid {os.getuid()})"
            )
        directory = os.path.realpath(self.opts.directory)
        if not os.path.isdir(directory):
            raise UsageError(f"{self.opts.directory}: not a directory")
        if self.switch and directory in FORBIDDEN_DIRS:
            raise UsageError(f"refusing to use {directory} as the job directory")
        self.directory = directory
        st = os.stat(directory)
        self.keep.add((st.st_dev, st.st_ino))  # emptied at the end, never removed

    def prepare(self) -> None:
        if self.switch:
            try:
                os.chown(self.directory, self.uid, self.gid)
                chown_tree(self.directory, self.uid, self.gid, self.keep)
            except OSError as exc:
                raise OSFailure(f"Error chowning directory {self.directory}: {exc}") from None
        # The job, not the autodriver, is what the OOM killer takes when the
        # job fills memory (tmpfs and memfd pages included): its output is kept.
        set_oom_score_adj(-1000)
        if not self.opts.no_cgroup:
            self.cgroups = setup_cgroups(self.mem)
        self.subreaper = set_child_subreaper()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _ignore_signal)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.interrupted:
            self.interrupted = signum

    def job_env(self) -> dict[str, str]:
        """A short, explicit environment: never the caller's (a server's keys and
        credentials live there), only what the image or pool declares (--env)."""
        env = {
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TERM": "dumb",
        }
        for item in self.opts.env:
            name, _, value = item.partition("=")
            if name and "\0" not in item:
                env[name] = value
        for name in MAKE_VARS:  # a make calling us must not leak its jobserver etc.
            env.pop(name, None)
        env["PWD"] = self.directory
        env["USER"] = env["LOGNAME"] = self.user
        home = self.home if self.switch else os.environ.get("HOME", self.home)
        env["HOME"] = home if home and os.path.isdir(home) else self.directory
        return env

    # -- the job ----------------------------------------------------------

    def start(self) -> int:
        """Fork and exec make; return the read end of its output pipe."""
        env = self.job_env()
        program = None if self.opts.no_seccomp else seccomp_program()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()  # close-on-exec: EOF means exec succeeded
        with contextlib.suppress(OSError):
            fcntl.fcntl(out_r, F_SETPIPE_SZ, PIPE_SIZE)
        try:
            pid = os.fork()
        except OSError as exc:
            raise OSFailure(f"Unable to fork: {exc}") from None
        if pid == 0:
            self._child(out_w, err_w, env, program)
        self.make_pid = pid
        os.close(out_w)
        os.close(err_w)
        error = b""
        while True:
            block = os.read(err_r, 4096)
            if not block:
                break
            error += block
        os.close(err_r)
        if error:
            os.waitpid(pid, 0)
            self.make_pid = -1
            raise OSFailure(error.decode("utf-8", "replace"))
        return out_r

    def _child(
        self, out_w: int, err_w: int, env: dict[str, str], program: bytes | None
    ) -> NoReturn:
        step = "starting the job"
        try:
            signal.set_wakeup_fd(-1)
            # Python ignores SIGPIPE and SIGXFSZ; the job needs the defaults
            # (e.g. so a write over RLIMIT_FSIZE says "File size limit exceeded").
            for sig in (
                signal.SIGPIPE,
                signal.SIGXFSZ,
                signal.SIGCHLD,
                signal.SIGTERM,
                signal.SIGINT,
                signal.SIGHUP,
            ):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            step = "creating a session"
            os.setsid()
            step = "joining the job's cgroup"
            for cg in self.cgroups:
                cg.join(os.getpid())
            step = "setting resource limits"
            limits = [(resource.RLIMIT_CORE, 0, 0)]
            if self.nproc:
                limits.append((resource.RLIMIT_NPROC, self.nproc, self.nproc))
            if self.fsize:
                limits.append((resource.RLIMIT_FSIZE, self.fsize, self.fsize))
            if self.cpu:  # SIGXCPU at the limit, SIGKILL a second later
                limits.append((resource.RLIMIT_CPU, self.cpu, self.cpu + 1))
            if self.mem and not any(cg.memory for cg in self.cgroups):
                limits.append((resource.RLIMIT_AS, self.mem, self.mem))
            for which, soft, hard in limits:
                resource.setrlimit(which, (soft, hard))
            # The job is the OOM killer's first choice, and cannot undo that
            # (written with CAP_SYS_RESOURCE, the value is also its minimum).
            set_oom_score_adj(1000)
            if self.switch:
                step = "dropping privileges"
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                if os.getresuid() != (self.uid,) * 3 or os.getresgid() != (self.gid,) * 3:
                    raise OSError(errno.EPERM, "uid/gid did not change")
            step = "restricting system calls"
            restrict_kernel(program)
            step = "changing to the job directory"
            os.chdir(self.directory)
            step = "redirecting output"
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            step = "closing inherited files"
            try:
                fds = [int(name) for name in os.listdir("/proc/self/fd")]
            except OSError:  # no /proc: the usual range
                fds = list(range(3, 1024))
            for fd in fds:
                if fd > 2 and fd != err_w:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            step = "executing make"
            os.execvpe("make", ["make"], env)
        except BaseException as exc:
            try:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                os.write(err_w, f"Error {step}: {detail}".encode())
            finally:
                os._exit(127)
        os._exit(127)  # not reached: execvpe does not return

    def monitor(self, out_r: int, capture: Capture) -> bool:
        """Read the output until make exits, the timeout or a signal; True if at EOF."""
        deadline = None if not self.timeout else time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(out_r, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        eof = False
        self.reap()
        while self.make_status is None and not self.interrupted:
            wait_ms = None
            now = time.monotonic()
            if deadline is not None:
                left = deadline - now
                if left <= 0:
                    self.timed_out = True
                    break
                wait_ms = int(left * 1000) + 1
            if self.partial_dirty:
                if now >= self.partial_due:
                    self.write_partial(capture)
                else:
                    due = int((self.partial_due - now) * 1000) + 1
                    wait_ms = due if wait_ms is None else min(wait_ms, due)
            for fd, _ in poller.poll(wait_ms):
                if fd == out_r:
                    data = os.read(out_r, READ_CHUNK)
                    if data:
                        capture.feed(data)
                        self.partial_dirty = self.opts.partial is not None
                    else:
                        eof = True
                        poller.unregister(out_r)
                else:
                    self.drain_wakeups()
                    self.reap()
        return eof

    def write_partial(self, capture: Capture) -> None:
        """Replace the --partial file with the output so far (never half-written)."""
        self.partial_dirty = False
        self.partial_due = time.monotonic() + PARTIAL_EVERY
        if capture.spool is not None:
            return  # unlimited output: no bounded snapshot to give
        path = self.opts.partial
        tmp = path + ".tmp"
        data = b"".join(capture.chunks())
        if len(data) > PARTIAL_MAX:
            # a view of the progress, not a second copy of the output
            data = data[: PARTIAL_MAX // 2] + ELISION + data[-(PARTIAL_MAX // 2) :]
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            pass  # a snapshot is a courtesy; the feedback is what counts

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    def reap(self) -> None:
        """Reap every child that exited (make, and orphans re-parented to us)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.make_pid:
                self.make_status = status

    def drain_output(self, out_r: int, capture: Capture) -> None:
        """Read what the (now dead) job left in the pipe; bounded in time."""
        os.set_blocking(out_r, False)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                data = os.read(out_r, READ_CHUNK)
            except BlockingIOError:
                return
            if not data:
                return
            capture.feed(data)

    # -- killing ----------------------------------------------------------

    def job_processes(self) -> list[Proc]:
        """Every live process of the job (never the autodriver itself)."""
        me = os.getpid()
        procs = all_procs()
        found: dict[int, Proc] = {}
        if self.switch:
            for p in procs:
                if self.uid in p.uids and p.alive and p.pid != me:
                    found[p.pid] = p
        else:
            children: dict[int, list[Proc]] = {}
            for p in procs:
                children.setdefault(p.ppid, []).append(p)
            todo = [me]
            while todo:
                for p in children.get(todo.pop(), []):
                    if p.pid not in found:
                        found[p.pid] = p
                        todo.append(p.pid)
            found = {pid: p for pid, p in found.items() if p.alive}
        by_pid = {p.pid: p for p in procs}
        for cg in self.cgroups:
            for pid in cg.pids():
                member = by_pid.get(pid)
                if member is not None and member.alive and pid != me:
                    found[pid] = member
        return list(found.values())

    def _kill_as_grader(self) -> None:
        """kill(-1, SIGKILL) as the grading uid: every process that uid owns."""
        try:
            pid = os.fork()
        except OSError:
            return
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                # kill(-1) as root would kill the whole machine: make sure.
                if self.uid != 0 and os.getresuid() == (self.uid,) * 3:
                    with contextlib.suppress(OSError):
                        os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        while True:
            try:
                os.waitpid(pid, 0)
                return
            except ChildProcessError:
                return
            except InterruptedError:
                continue

    def kill_job(self) -> bool:
        """Kill every process of the job; False if some survive."""
        deadline = time.monotonic() + KILL_SECONDS
        pause = 0.002
        while True:
            self.reap()
            left = self.job_processes()
            if not left:
                return True
            if self.make_pid > 0:
                with contextlib.suppress(OSError):
                    os.killpg(self.make_pid, signal.SIGKILL)
            for cg in self.cgroups:
                cg.kill()
            if self.switch:
                self._kill_as_grader()
            else:
                self._kill_pids(left)
            if time.monotonic() >= deadline:
                break
            time.sleep(pause)  # SIGKILLed tasks need a moment to exit
            pause = min(pause * 2, 0.1)
        # Last resort: by pid (root reaches processes whose uid changed, too).
        self._kill_pids(self.job_processes())
        end = time.monotonic() + 0.5
        while True:
            self.reap()
            if not self.job_processes():
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)

    def _kill_pids(self, procs: list[Proc]) -> None:
        for p in procs:
            current = read_proc(p.pid)  # re-check just before, against pid reuse
            if current is None or current.uids != p.uids:
                continue
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGKILL)

    def reap_all(self) -> None:
        """Reap our remaining children (killed job processes), briefly."""
        end = time.monotonic() + 0.5
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == self.make_pid:
                self.make_status = status
            if pid == 0:
                if time.monotonic() >= end:
                    return
                time.sleep(0.005)

    # -- feedback ---------------------------------------------------------

    def status_lines(self, capture: Capture, killed_all: bool) -> list[str]:
        lines = []
        if self.interrupted:
            lines.append(f"Job interrupted: autodriver received {signal_name(self.interrupted)}")
        elif self.timed_out:
            lines.append(f"Job timed out after {format_seconds(self.timeout)} seconds")
        else:
            status = self.make_status if self.make_status is not None else 0
            if os.WIFSIGNALED(status):
                # Tango prints WEXITSTATUS, i.e. "status 0" for a killed make,
                # which reads as success.  Use the shell's convention 128+N so
                # the line keeps its format and is never 0, then say why.
                sig = os.WTERMSIG(status)
                lines.append(f"Job exited with status {128 + sig}")
                lines.append(f"make was killed by signal {sig} ({signal_name(sig)})")
            else:
                lines.append(f"Job exited with status {os.WEXITSTATUS(status)}")
        if self.mem and self.memory_exceeded(capture):
            lines.append(f"memory limit of {self.mem} bytes exceeded")
        if not killed_all:
            lines.append("Gave up killing user processes")
        return lines

    def memory_exceeded(self, capture: Capture) -> bool:
        verdicts = [cg.oom_killed() for cg in self.cgroups if cg.memory]
        if any(verdicts):
            return True  # the kernel's OOM killer killed a process of the job
        # Otherwise only hints: trust them only if the job failed, so a job
        # that merely prints "out of memory" is not accused.
        if self.timed_out or self.make_status is None or self.make_status != 0:
            if None in verdicts and any(cg.limit_hit() for cg in self.cgroups if cg.memory):
                return True  # a cgroup without an OOM kill counter (Linux < 4.13)
            pieces = capture.sample()
            return any(pattern in piece for piece in pieces for pattern in OOM_PATTERNS)
        return False

    def write_feedback(self, lines: list[str], capture: Capture) -> bool:
        try:
            self.reclaim_output()
            _write_all(self.out_fd, "".join(HEADER + line + "\n" for line in lines).encode())
            for chunk in capture.chunks():
                _write_all(self.out_fd, chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                _write_all(2, f"{HEADER}Error writing the feedback: {exc}\n".encode())
            return False
        return True

    def quota_lines(self) -> list[str]:
        """A line for each quota file system the job filled (bytes or inodes)."""
        lines: list[str] = []
        seen: set[int] = set()
        for path in (self.directory, *CLEAN_ROOTS):
            try:
                dev = os.stat(path).st_dev
                st = os.statvfs(path)
            except OSError:
                continue
            if dev in seen:
                continue
            seen.add(dev)
            if st.f_blocks and st.f_bavail == 0:
                lines.append(f"disk quota of {st.f_blocks * st.f_frsize} bytes exceeded")
            if st.f_files and st.f_favail == 0:
                lines.append(f"inode quota of {st.f_files} files exceeded")
        return lines

    def cleanup_files(self) -> int:
        if not self.switch or self.opts.no_cleanup:
            return 0
        failed = remove_owned(self.directory, self.uid, self.keep)
        seen = {self.directory}
        for root in CLEAN_ROOTS:
            real = os.path.realpath(root)
            if real not in seen:
                seen.add(real)
                failed += remove_owned(real, self.uid, self.keep)
        return failed

    # -- all of it --------------------------------------------------------

    def run(self) -> int:
        self.prepare()
        capture = Capture(self.osize)
        try:
            out_r = self.start()
            try:
                self.monitor(out_r, capture)
                killed_all = self.kill_job()
                # Before anything else is read into memory: a job may have
                # filled the memory cgroup with files (tmpfs pages stay after
                # its processes die); removing them gives the memory back.
                quota = self.quota_lines() if self.opts.quota else []
                failed = self.cleanup_files() if killed_all else 0
                self.drain_output(out_r, capture)
            finally:
                os.close(out_r)
            self.reap_all()
            if self.opts.partial:
                # only meaningful while the job runs; never beside the feedback
                for path in (self.opts.partial, self.opts.partial + ".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            lines = self.status_lines(capture, killed_all) + quota
            if failed:
                lines.append(f"could not remove {failed} files of the grading user")
            delivered = self.write_feedback(lines, capture)
        finally:
            capture.close()
            if self.make_pid > 0 and self.make_status is None:
                self.kill_job()  # an exception above must not leave the job running
            for cg in self.cgroups:
                cg.remove()
        if not delivered or self.interrupted or not killed_all:
            return EXIT_OSERROR
        return EXIT_TIMEOUT if self.timed_out else EXIT_OK


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGCHLD only needs to wake the poll loop (through the wakeup fd)."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _say(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        _write_all(fd, (HEADER + message + "\n").encode())


_VALUED: dict[str, tuple[str, Callable[[str], Any]]] = {
    "-u": ("nproc", parse_count), "--nproc": ("nproc", parse_count),
    "-f": ("fsize", parse_size), "--fsize": ("fsize", parse_size),
    "-t": ("timeout", parse_seconds), "--timeout": ("timeout", parse_seconds),
    "-o": ("osize", parse_size), "--osize": ("osize", parse_size),
    "--mem": ("mem", parse_size), "--cpu": ("cpu", parse_count),
    "--user": ("user", str), "--output": ("output", str), "--partial": ("partial", str),
}
_SWITCHES = {"--no-cleanup": "no_cleanup", "--no-cgroup": "no_cgroup", "--quota": "quota",
             "--no-seccomp": "no_seccomp"}


def quick_parse(argv: list[str]) -> Any:
    """The command line as argparse would read it, or None for anything
    unusual (an error, --help, an abbreviation): argparse then has its say."""
    import types

    values: dict[str, Any] = {
        "nproc": 0, "fsize": 0, "timeout": 0.0, "osize": 0, "mem": 0, "cpu": 0,
        "user": DEFAULT_USER, "output": None, "partial": None,
        "no_cleanup": False, "no_cgroup": False, "quota": False, "no_seccomp": False,
        "env": [],
    }
    positional: list[str] = []
    i = 0
    try:
        while i < len(argv):
            arg = argv[i]
            if arg in _SWITCHES:
                values[_SWITCHES[arg]] = True
                i += 1
                continue
            if arg.startswith("--") and "=" in arg:
                name, value = arg.split("=", 1)
                i += 1
            elif arg in _VALUED or arg == "--env":
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    return None
                name, value = arg, argv[i + 1]
                i += 2
            elif arg[:2] in ("-u", "-f", "-t", "-o") and len(arg) > 2:
                name, value = arg[:2], arg[2:]
                i += 1
            elif arg.startswith("-"):
                return None
            else:
                positional.append(arg)
                i += 1
                continue
            if name == "--env":
                if "=" not in value:
                    return None
                values["env"].append(value)
                continue
            if name not in _VALUED:
                return None
            dest, convert = _VALUED[name]
            values[dest] = convert(value)
    except _BadValue:
        return None
    if len(positional) != 1:
        return None
    return types.SimpleNamespace(directory=positional[0], **values)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = quick_parse(args) or build_parser().parse_args(args)
    except UsageError as exc:
        _say(1, str(exc))
        return EXIT_USAGE
    driver = Autodriver(opts)
    try:
        driver.open_output()
        driver.check()
    except UsageError as exc:
        _say(driver.out_fd, str(exc))
        return EXIT_USAGE
    try:
        return driver.run()
    except OSFailure as exc:
        _say(driver.out_fd, str(exc))
        return EXIT_OSERROR
    except OSError as exc:
        _say(driver.out_fd, f"OS error: {exc}")
        return EXIT_OSERROR


if __name__ == "__main__":
    sys.exit(main())
