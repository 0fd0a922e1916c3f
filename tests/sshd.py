"""Real OpenSSH servers on 127.0.0.1 for the SSH Docker driver's tests.

Each "host" is an ``sshd -D -e -f CONFIG`` of its own (its own port, host
key and pid), with a generated client key and a dedicated unprivileged
login user that may use the one Docker engine the tests run. If sshd
cannot start, the test fails, loudly (it is never skipped).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import socket
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SSHD = "/usr/sbin/sshd"
USER = "vmpool-ssh"


def ensure_user() -> None:
    """The login user (and its group), made once; it may use the Docker socket."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/nonexistent",
                        "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    # an account with a locked password may still log in with a key (no PAM)
    subprocess.run(["usermod", "-p", "*", USER], check=True)


def share_docker_socket(docker_host: str) -> str:
    """Let the login user use the engine's socket; returns its path."""
    ensure_user()
    path = docker_host.removeprefix("unix://")
    gid = grp.getgrnam(USER).gr_gid
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    return path


def keygen(path: Path) -> str:
    """An ed25519 key pair at ``path`` (+ .pub); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path.with_suffix(".pub").read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SSHHost:
    """One sshd: a "host" of the SSH Docker driver."""

    name: str
    dir: Path
    port: int
    host_key_line: str
    proc: subprocess.Popen[bytes] | None = None
    log: deque[str] = field(default_factory=deque)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    def known_hosts_line(self) -> str:
        kind, key = self.host_key_line.split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}"

    def start(self) -> None:
        """Start sshd and wait until it listens (bounded: fails loudly)."""
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        seen: deque[str] = deque(maxlen=200)
        self.log = seen
        listening = threading.Event()

        def read_log() -> None:
            # until it listens, then drained for good (a full pipe would block it)
            for raw in stderr:
                seen.append(raw.decode(errors="replace").strip())
                if "Server listening on" in seen[-1]:
                    listening.set()

        threading.Thread(target=read_log, name=f"sshd-{self.name}-log", daemon=True).start()
        if not listening.wait(20):
            self.kill()
            raise RuntimeError(f"sshd {self.name} did not listen: {' | '.join(seen[-10:])}")

    def kill(self) -> None:
        """Kill this sshd and every connection it serves: the host is gone."""
        if self.proc is None:
            return
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


class SSHHosts:
    """N sshd "hosts", a client key and a known_hosts file that has them all."""

    def __init__(self, root: Path, n: int, docker_socket: str) -> None:
        ensure_user()
        self.root = root
        self.docker_socket = docker_socket
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.client_key = root / "client_key"
        self.client_pub = keygen(self.client_key)
        (root / "authorized_keys").write_text(self.client_pub + "\n")
        os.chmod(root / "authorized_keys", 0o644)
        self.hosts: list[SSHHost] = []
        for i in range(n):
            d = root / f"h{i}"
            d.mkdir()
            line = keygen(d / "host_key")
            host = SSHHost(f"h{i}", d, free_port(), line)
            self._write_config(host)
            self.hosts.append(host)
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text("".join(h.known_hosts_line() + "\n" for h in self.hosts))

    def _write_config(self, h: SSHHost) -> None:
        h.config.write_text(
            f"Port {h.port}\nListenAddress 127.0.0.1\nHostKey {h.dir / 'host_key'}\n"
            f"PidFile {h.dir / 'sshd.pid'}\nAuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            f"AllowUsers {USER}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "AllowStreamLocalForwarding local\nX11Forwarding no\n"
            "PermitTTY no\nMaxSessions 10\nMaxStartups 100:30:200\nLogLevel INFO\n"
            "ClientAliveInterval 0\n"
        )

    def start(self) -> None:
        for h in self.hosts:
            h.start()

    def stop(self) -> None:
        for h in self.hosts:
            h.kill()

    def spec(self, h: SSHHost, **kw: Any) -> dict[str, Any]:
        """The driver's option for host ``h``."""
        return {"name": h.name, "address": "127.0.0.1", "port": h.port, "user": USER,
                "key": str(self.client_key), "known_hosts": str(self.known_hosts),
                "docker_socket": self.docker_socket, **kw}
