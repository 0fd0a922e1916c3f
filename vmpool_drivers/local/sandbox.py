"""The local driver's sandbox policy, in one place: the bubblewrap command,
the VM's quota file system and its network namespace.

What a job sees (an allow-list, not a list of things hidden):

- the image's system directories read-only: for the host's own root file
  system only ``/usr``, ``/bin``, ``/sbin``, ``/lib*``, ``/etc`` and
  ``/opt`` (plus ``extra_ro_paths``), never ``/root``, ``/home``, ``/var``,
  ``/srv``, ``/mnt``, ``/run`` or the state directories; an image that is a
  root file system of its own is bound whole. Paths the server names
  (courselabs, job database, config file) are covered by an empty file or
  directory wherever they would show through;
- its job directory, ``/tmp``, ``/var/tmp`` and ``/dev/shm``, all on ONE
  tmpfs per VM with a size and an inode limit (its pages are charged to the
  VM's memory cgroup), so the job's total disk use is bounded and nothing of
  it lands on the host's disk;
- a fresh /dev, /proc of its own pid namespace, its own ipc and uts
  namespaces, an empty /run, passwd/group files naming only root, the
  grading user and nobody;
- a short environment (``--clearenv``);
- a network namespace: an empty one (only ``lo``) for a job that disables
  the network; for one that allows it, the VM's own namespace, reaching out
  through pasta (a user-mode stack, no port forwarding into or out of the
  namespace, the gateway not mapped to the host), where the host's loopback
  is the namespace's own, the host's addresses are the namespace's own or
  unreachable, and link-local addresses (cloud metadata) are unreachable.
  ``network="host-unsafe"`` shares the host's namespace: it is unsafe, and
  says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmpool_drivers.policy import AUTODRIVER_CAPS, SANDBOX_ENV

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
JOB_DIR_IN_SANDBOX = "/home/autograde/autolab"
OUT_DIR_IN_SANDBOX = "/run/vmpool/out"
AUTODRIVER_IN_SANDBOX = "/run/vmpool/autodriver.py"
#: capabilities of the autodriver as root inside the sandbox (bubblewrap's names)
CAPS = tuple(f"CAP_{c}" for c in AUTODRIVER_CAPS)
#: the addresses a job never reaches, whatever else it may (link-local:
#: cloud metadata services live there)
UNREACHABLE = ("169.254.0.0/16", "fd00:ec2::254/128")

Network = Literal["pasta", "none", "host-unsafe"]
JobNet = Literal["none", "vm", "host"]


@dataclass(frozen=True)
class Layout:
    """Where a VM's parts are on the host (``d`` is the VM's directory)."""

    d: Path

    @property
    def fs(self) -> Path:  # the quota tmpfs: job, tmp, vartmp, shm
        return self.d / "fs"

    @property
    def job(self) -> Path:
        return self.fs / "job"

    @property
    def out(self) -> Path:
        return self.d / "out"

    @property
    def empty(self) -> Path:  # an empty file that covers hidden files
        return self.d / "empty"

    @property
    def netns(self) -> Path:
        return self.d / "netns"

    @property
    def pasta_pid(self) -> Path:
        return self.d / "pasta.pid"

    def scratch(self) -> dict[str, Path]:
        """Sandbox path -> host directory of the job's writable places."""
        return {
            JOB_DIR_IN_SANDBOX: self.job,
            "/tmp": self.fs / "tmp",
            "/var/tmp": self.fs / "vartmp",
            "/dev/shm": self.fs / "shm",
        }


# ------------------------------------------------------------------ bwrap


def bwrap_command(
    bwrap: str,
    layout: Layout,
    argv: Sequence[str],
    *,
    root: str,
    net: JobNet,
    hostname: str,
    hidden: Iterable[str] = (),
    extra_ro: Iterable[str] = (),
) -> list[str]:
    """The bubblewrap command line that runs ``argv`` in a VM's sandbox."""
    cmd = [bwrap, "--clearenv"]
    for name, value in SANDBOX_ENV.items():
        cmd += ["--setenv", name, value]
    made: set[str] = set()
    if root == "/":
        for d in [*SYSTEM_DIRS, *extra_ro]:
            p = Path(d)
            if p.is_symlink():  # merged /usr: /bin -> usr/bin
                cmd += ["--symlink", os.readlink(p), d]
            elif p.is_dir():
                cmd += [*parents(d, made), "--ro-bind", d, d]
        visible = [*SYSTEM_DIRS, *extra_ro]
    else:
        cmd += ["--ro-bind", root, "/"]
        visible = ["/"]
    cmd += cover(hidden, visible, root, str(layout.empty))
    cmd += ["--dev", "/dev", "--proc", "/proc", "--perms", "0755", "--tmpfs", "/run"]
    for inside, host in layout.scratch().items():
        if inside != JOB_DIR_IN_SANDBOX:
            cmd += [*parents(inside, made), "--bind", str(host), inside]
    cmd += [
        "--perms", "0755", "--dir", "/home", "--perms", "0755", "--dir", "/home/autograde",
        "--bind", str(layout.job), JOB_DIR_IN_SANDBOX,
        "--perms", "0700", "--dir", "/run/vmpool",
        "--bind", str(layout.out), OUT_DIR_IN_SANDBOX,
        "--ro-bind", str(layout.d / "autodriver.py"), AUTODRIVER_IN_SANDBOX,
        "--ro-bind", str(layout.d / "etc" / "passwd"), "/etc/passwd",
        "--ro-bind", str(layout.d / "etc" / "group"), "/etc/group",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",
    ]
    for cap in held(CAPS):
        cmd += ["--cap-add", cap]
    if net == "none":
        cmd.append("--unshare-net")
    cmd += ["--chdir", "/", "--"]
    return cmd + list(argv)


_CAP_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2,
                "CAP_FOWNER": 3, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7,
                "CAP_SYS_RESOURCE": 24}


def held(caps: Iterable[str]) -> list[str]:
    """The capabilities of ``caps`` this process holds. Asked for one it does
    not hold (a host whose root lacks CAP_SYS_RESOURCE), bubblewrap would keep
    every capability instead: never ask."""
    permitted = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapPrm:"):
                permitted = int(line.split()[1], 16)
    return [c for c in caps if permitted >> _CAP_NUMBERS[c] & 1]


def parents(path: str, made: set[str]) -> list[str]:
    """Options making each missing ancestor of ``path`` (mode 0755: bubblewrap
    would make them 0700, closed to the job)."""
    opts: list[str] = []
    for parent in reversed(Path(path).parents[:-1] if Path(path).parents else ()):
        p = str(parent)
        if p not in made and not any(p == d or p.startswith(d + "/") for d in SYSTEM_DIRS):
            made.add(p)
            opts += ["--perms", "0755", "--dir", p]
    return opts


def cover(hidden: Iterable[str], visible: Sequence[str], root: str, empty: str) -> list[str]:
    """bwrap options covering each hidden path that would show in the sandbox
    (under a directory bound into it) with an empty directory or file."""
    opts: list[str] = []
    for raw in hidden:
        if not raw:
            continue
        real = os.path.realpath(raw)
        for path in dict.fromkeys((os.path.abspath(raw), real)):
            inside = path if root == "/" else None
            if root != "/" and Path(path).is_relative_to(root):
                inside = "/" + os.path.relpath(path, root)
            if inside is None or not any(Path(inside).is_relative_to(v) for v in visible):
                continue
            if Path(path).is_dir():
                opts += ["--perms", "0700", "--tmpfs", inside]
            elif Path(path).exists():
                opts += ["--ro-bind", empty, inside]
    return opts


# ------------------------------------------------------------------ quota


_libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2


def mount_quota(path: Path, size: int, inodes: int) -> None:
    """A tmpfs of ``size`` bytes and ``inodes`` inodes at ``path``."""
    opts = f"size={size},nr_inodes={inodes},mode=0711".encode()
    if _libc.mount(b"vmpool", str(path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mounting the quota tmpfs at {path}: {os.strerror(e)}")


def detach(path: Path) -> None:
    """Unmount ``path`` (lazily: gone for good once nothing uses it)."""
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (22, 2):  # EINVAL: not a mount point; ENOENT
            raise OSError(e, f"unmounting {path}: {os.strerror(e)}")


def is_mount(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return path.is_mount()
    return False


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything in it, at any depth, never crossing
    into another file system: ``rm`` walks the tree, not Python's stack."""
    if not path.exists() and not path.is_symlink():
        return
    done = subprocess.run(
        ["rm", "-rf", "--one-file-system", "--", str(path)],
        capture_output=True, timeout=600, check=False,
    )
    if path.exists():
        raise OSError(f"could not remove {path}: {done.stderr.decode(errors='replace')[:300]}")


# ------------------------------------------------------------------ network


def pasta_binary() -> str | None:
    return shutil.which("pasta")


def create_netns(layout: Layout, pasta: str) -> None:
    """The VM's network namespace (bind-mounted at ``layout.netns``), its
    outbound access through pasta, and the addresses it must never reach."""
    ns = layout.netns
    ns.touch(mode=0o600)
    _run(["unshare", f"--net={ns}", "true"])
    enter = ["nsenter", f"--net={ns}", "--"]
    _run([*enter, "ip", "link", "set", "lo", "up"])
    # --runas 0: pasta as root isolates itself (its own namespaces, no
    # capabilities, seccomp) but can still join a namespace we made; as
    # nobody it cannot. -t/-u/-T/-U none: no port is forwarded, in either
    # direction (the default "auto" would map the host's loopback ports
    # into the namespace). --no-map-gw: the gateway is not the host.
    _run([pasta, "--quiet", "--runas", "0", "--config-net", "--no-map-gw",
          "-t", "none", "-u", "none", "-T", "none", "-U", "none",
          "--netns", str(ns), "--pid", str(layout.pasta_pid)])
    routes = [*UNREACHABLE, *(f"{a}/{'32' if ':' not in a else '128'}" for a in host_addresses())]
    batch = "".join(f"route add unreachable {r}\n" for r in routes)
    subprocess.run([*enter, "ip", "-force", "-batch", "-"], input=batch.encode(),
                   capture_output=True, timeout=30, check=False)


def remove_netns(layout: Layout) -> None:
    """Stop the VM's pasta (only if the pid is still that pasta) and drop the namespace."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(layout.pasta_pid.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if str(layout.netns).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)
    if layout.netns.exists():
        detach(layout.netns)
        with contextlib.suppress(OSError):
            layout.netns.unlink()


def host_addresses() -> list[str]:
    """The host's own addresses but loopback (``ip -j address``)."""
    try:
        out = subprocess.run(["ip", "-j", "address"], capture_output=True, timeout=10,
                             check=True).stdout
        found = []
        for link in json.loads(out):
            for a in link.get("addr_info", []):
                ip = ipaddress.ip_address(a["local"])
                if not ip.is_loopback and not ip.is_link_local:
                    found.append(str(ip))
        return found
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return []


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        raise OSError(
            f"{cmd[0]} failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).decode(errors='replace').strip()[:300]}"
        )
