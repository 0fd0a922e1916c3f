"""A fake cloud for the EC2 driver's tests: moto as the EC2 endpoint, real
sshd "machines" on 127.0.0.1 for its instances, and fault switches.

* :class:`MotoServer`: moto in server mode on 127.0.0.1 (the EC2 API).
* :func:`ensure_ami_image`: ``vmpool/ec2-ami:latest``, the grading image plus
  the host's own sshd (same Debian suite), built with no registry and no
  network from inside a container.
* :class:`EC2World`: the driver's endpoint resolver. The first time an
  instance is resolved it becomes a container of its own (own file system,
  own uid for the grading user) running ``sshd -D -e`` on a free port of
  127.0.0.1 with the host key the driver put in the instance's user data.
  Faults: unreachable instances, wrong host keys, cut connections, killed
  machines.
* :class:`FaultProxy`: an HTTP proxy in front of moto that refuses or slows
  chosen EC2 actions.

Nothing here talks to the addresses moto makes up, nor to the instance
metadata service: every socket is on 127.0.0.1. If a piece cannot start, it
raises (tests fail loudly, they are never skipped).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.client
import http.server
import io
import itertools
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import yaml  # type: ignore[import-untyped]

from .sshd import SSHD, free_port, keygen

EC2Client = Any  # boto3's EC2 client (no stubs installed)

# Before moto is imported: no catalogue of default AMIs (a slower reset), and
# never the instance metadata service for credentials (boto3 and aiobotocore).
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
BASE_IMAGE = "vmpool/grader:latest"
AMI_IMAGE = "vmpool/ec2-ami:latest"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
MODULI = "/etc/ssh/moduli"
WORLD_LABEL = "vmpool.ec2world"
INSTANCE_LABEL = "vmpool.ec2world.instance"
LISTEN_TIMEOUT = 30.0
UID_BASE = 62100

_uids = itertools.count()  # grading uids are unique per instance, across worlds


def _next_uid() -> int:
    n = next(_uids)
    return UID_BASE + n if UID_BASE + n < 65000 else 70000 + n


# --- moto -------------------------------------------------------------------


class MotoServer:
    """moto's EC2 (every service, in fact) on ``http://127.0.0.1:PORT``.

    ``validate`` makes RunInstances check its ImageId and KeyName as EC2 does
    (moto accepts any by default)."""

    def __init__(self, *, validate: bool = True, quiet: bool = True) -> None:
        from moto import settings
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
        if validate:
            settings.ENABLE_AMI_VALIDATION = True
            settings.ENABLE_KEYPAIR_VALIDATION = True
        if quiet:
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # port 0: the kernel's free port, taken by the server itself (no race;
        # a bind error in moto's thread would leave start() waiting forever)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        _host, port = self._server.get_host_and_port()
        self.port = int(port)
        self.url = f"http://127.0.0.1:{self.port}"
        self._client = self.client()
        self._client.describe_regions()  # the first request loads moto's EC2 (~2 s)

    def client(self, url: str | None = None, *, attempts: int = 1) -> EC2Client:
        """A synchronous boto3 EC2 client (no retries unless ``attempts``)."""
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config

        return boto3.client(
            "ec2", region_name=REGION, endpoint_url=url or self.url,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                          connect_timeout=10, read_timeout=60),
        )

    def settings(self) -> dict[str, Any]:
        """Endpoint, region and credentials, for a driver's options."""
        return {"endpoint_url": self.url, "region": REGION,
                "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}

    def reset(self) -> None:
        """moto's reset API: every resource of every service is forgotten."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def register_ami(self, name: str) -> str:
        """An available, EBS-backed x86_64 AMI; returns its id.

        moto's RegisterImage keeps only the name and description (its AMIs
        say RootDeviceType "standard", root /dev/sda1), so the image is
        completed in moto's in-process backend to what EC2 would report."""
        ami_id: str = self._client.register_image(
            Name=name, Architecture="x86_64", VirtualizationType="hvm",
            RootDeviceName="/dev/xvda", EnaSupport=True,
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {
                "VolumeSize": 8, "VolumeType": "gp3", "DeleteOnTermination": True}}],
        )["ImageId"]
        owner = self._client.describe_images(ImageIds=[ami_id])["Images"][0]["OwnerId"]
        from moto.ec2.models import ec2_backends

        ami = ec2_backends[owner][REGION].amis[ami_id]
        ami.root_device_type = "ebs"
        ami.root_device_name = "/dev/xvda"
        ami.architecture = "x86_64"
        ami.virtualization_type = "hvm"
        return ami_id

    def import_key_pair(self, name: str, public_key_line: str) -> str:
        """An EC2 key pair from an OpenSSH public key line; returns its id."""
        r = self._client.import_key_pair(KeyName=name,
                                         PublicKeyMaterial=public_key_line.encode())
        return str(r["KeyPairId"])

    def stop(self) -> None:
        self._client.close()
        self._server.stop()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- docker -----------------------------------------------------------------


def _docker(docker_host: str, *args: str, input: bytes | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(["docker", *args], input=input, capture_output=True, timeout=timeout,
                       env={**os.environ, "DOCKER_HOST": docker_host},
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} failed ({r.returncode}): "
                           f"{r.stderr.decode(errors='replace').strip()}")
    return r


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A tar of ``{path in container: (content, mode)}``, owned by root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.uid, info.gid = len(data), mode, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _image_labels(docker_host: str, image: str) -> dict[str, str] | None:
    r = _docker(docker_host, "image", "inspect", "-f", "{{json .Config.Labels}}", image,
                check=False)
    if r.returncode != 0:
        return None
    import json

    labels = json.loads(r.stdout.decode() or "null")
    return dict(labels or {})


def _image_id(docker_host: str, image: str) -> str | None:
    r = _docker(docker_host, "image", "inspect", "-f", "{{.Id}}", image, check=False)
    return r.stdout.decode().strip() if r.returncode == 0 else None


def _sshd_files() -> list[str]:
    """sshd, sftp-server, moduli and every shared library they load."""
    programs = [SSHD, *([SFTP_SERVER] if Path(SFTP_SERVER).exists() else [])]
    libs: set[str] = set()
    for prog in programs:
        out = subprocess.run(["ldd", prog], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > parts.index("=>") + 1:
                path = parts[parts.index("=>") + 1]
            elif parts and parts[0].startswith("/"):
                path = parts[0]
            else:
                continue
            if path.startswith("/"):
                libs.add(path)
    return [*programs, MODULI, *sorted(libs)]


_SETUP = """set -e
ldconfig
getent passwd sshd >/dev/null || useradd --system --no-create-home --home-dir /run/sshd \
  --shell /usr/sbin/nologin sshd
mkdir -p /run/sshd /etc/ssh
chmod 755 /run/sshd
"""


def ensure_ami_image(docker_host: str) -> str:
    """``vmpool/ec2-ami:latest``: vmpool/grader plus the host's sshd. Returns
    its name. Fast when it exists for the current base image and sshd; built
    otherwise (host files copied in, no network), then checked with ``sshd -t``."""
    if not Path(SSHD).exists():
        raise RuntimeError(f"{SSHD} missing: apt-get install openssh-server")
    base_id = _image_id(docker_host, BASE_IMAGE)
    if base_id is None:
        raise RuntimeError(f"{BASE_IMAGE} missing: run scripts/build-image.sh")
    sshd_sum = hashlib.sha256(Path(SSHD).read_bytes()).hexdigest()[:16]
    want = {"vmpool.ec2-ami.base": base_id, "vmpool.ec2-ami.sshd": sshd_sum}
    lock_path = Path(tempfile.gettempdir()) / "vmpool-ec2-ami.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        labels = _image_labels(docker_host, AMI_IMAGE)
        if labels is not None and all(labels.get(k) == v for k, v in want.items()):
            return AMI_IMAGE
        _build_ami_image(docker_host, want)
    return AMI_IMAGE


def _build_ami_image(docker_host: str, labels: dict[str, str]) -> None:
    files = _sshd_files()
    check = "for f in \"$@\"; do [ -e \"$f\" ] || echo \"$f\"; done"
    r = _docker(docker_host, "run", "--rm", "--network", "none", BASE_IMAGE,
                "/bin/sh", "-c", check, "sh", *files)
    missing = set(r.stdout.decode().split())
    wanted = [f for f in files if f in missing or f in (SSHD, SFTP_SERVER, MODULI)]
    content: dict[str, tuple[bytes, int]] = {}
    for f in wanted:
        real = os.path.realpath(f)
        # the directory's real path: /lib is a symlink to usr/lib in both
        dest = os.path.join(os.path.realpath(os.path.dirname(f)), os.path.basename(f))
        content[dest] = (Path(real).read_bytes(), os.stat(real).st_mode & 0o7777)
    name = f"vmpool-ec2-ami-build-{uuid.uuid4().hex[:8]}"
    try:
        _docker(docker_host, "create", "--name", name, "--network", "none", BASE_IMAGE,
                "/bin/sh", "-c", _SETUP)
        _docker(docker_host, "cp", "-", f"{name}:/", input=_tar(content))
        _docker(docker_host, "start", "-a", name)
        changes = " ".join(f'"{k}"="{v}"' for k, v in labels.items())
        _docker(docker_host, "commit", "--change", f"LABEL {changes}",
                "--change", 'CMD ["/usr/sbin/sshd", "-D", "-e"]', name, AMI_IMAGE)
    finally:
        _docker(docker_host, "rm", "-f", name, check=False)
    with tempfile.TemporaryDirectory() as d:
        keygen(Path(d) / "k")
        key = (Path(d) / "k").read_bytes()
    verify = ("cat > /tmp/hk && chmod 600 /tmp/hk && "
              "/usr/sbin/sshd -t -f /dev/null -h /tmp/hk && rm /tmp/hk")
    r = _docker(docker_host, "run", "--rm", "-i", "--network", "none", AMI_IMAGE,
                "/bin/sh", "-c", verify, input=key, check=False)
    if r.returncode != 0:
        _docker(docker_host, "rmi", "-f", AMI_IMAGE, check=False)
        raise RuntimeError(f"{AMI_IMAGE} cannot run sshd: {r.stderr.decode(errors='replace')}")


# --- the world --------------------------------------------------------------


@dataclass
class Endpoint:
    """One instance's machine, as the world made it."""

    instance_id: str
    port: int
    host: str = "127.0.0.1"
    container: str | None = None  # id; None: no machine (unreachable, killed, terminated)
    name: str | None = None
    uid: int | None = None  # the grading user's uid in this machine
    host_key_line: str | None = None  # the public host key its sshd presents
    fault: str | None = None  # "unreachable" | "wrong_host_key"
    running: bool = False
    dead: bool = False  # killed or terminated: never started again
    dir: Path | None = None

    def known_hosts_line(self) -> str:
        assert self.host_key_line is not None
        kind, key = self.host_key_line.split()[:2]
        return f"[{self.host}]:{self.port} {kind} {key}"


class WorldError(RuntimeError):
    """The world could not do what the driver's instance asked for."""


class EC2World:
    """Instances of one moto server as machines on 127.0.0.1 (see module doc).

    ``resolve`` is what the driver calls for an instance's SSH endpoint. The
    instance's state is asked of moto on every call: a stopped instance's
    machine is killed (its file system kept, started again when it runs
    again), a terminated one's removed, and either answers with a port
    where nothing listens."""

    def __init__(self, moto: MotoServer, docker_host: str, root: Path, key_file: Path,
                 public_key: str, *, image: str = AMI_IMAGE) -> None:
        self.moto = moto
        self.docker_host = docker_host
        self.root = root
        self.key_file = key_file
        self.public_key = public_key.strip()
        self.image = image
        self.id = uuid.uuid4().hex[:10]
        self.errors: list[str] = []
        self._ec2 = moto.client()
        self._endpoints: dict[str, Endpoint] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._faults: deque[str] = deque()  # armed, in order, one per instance
        self._mutex = threading.Lock()
        self._holders: list[socket.socket] = []  # bound, never listening: refused
        self._nowhere = self._dead_port()
        root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, moto: MotoServer, docker_host: str, root: Path) -> EC2World:
        """A world with a client key pair of its own (``world.key_file``);
        builds the AMI image if needed."""
        image = ensure_ami_image(docker_host)
        root.mkdir(parents=True, exist_ok=True)
        key = root / "client_key"
        return cls(moto, docker_host, root, key, keygen(key), image=image)

    # faults: armed in order, each taken by the next instance resolved for the first time

    def unreachable(self, n: int = 1) -> None:
        """The next ``n`` instances resolved for the first time get a port
        where nothing listens (connections are refused); no machine."""
        with self._mutex:
            self._faults.extend(["unreachable"] * n)

    def wrong_host_key(self, n: int = 1) -> None:
        """The next ``n`` instances resolved for the first time present a
        fresh host key, not the one of their user data."""
        with self._mutex:
            self._faults.extend(["wrong_host_key"] * n)

    async def cut(self, instance_id: str) -> int:
        """Kill every sshd session process of the instance's machine (its
        connections drop; the listener stays). Returns how many."""
        return await anyio.to_thread.run_sync(self._cut, instance_id)

    async def kill_instance(self, instance_id: str) -> None:
        """Remove the instance's machine for good (moto still says running)."""
        await anyio.to_thread.run_sync(self._kill, instance_id)

    # endpoints

    async def resolve(self, instance: dict[str, Any]) -> tuple[str, int]:
        """(host, port) of the instance's sshd; its machine is made on the first call."""
        iid = str(instance["InstanceId"])
        lock = self._locks.setdefault(iid, anyio.Lock())
        async with lock:
            ep = await anyio.to_thread.run_sync(self._resolve, iid)
        return ep.host, ep.port

    def endpoint_of(self, instance_id: str) -> Endpoint | None:
        return self._endpoints.get(instance_id)

    def endpoints(self) -> dict[str, Endpoint]:
        return dict(self._endpoints)

    def containers(self, *, all: bool = False) -> list[str]:
        """Names of this world's containers (running ones unless ``all``)."""
        r = _docker(self.docker_host, "ps", *(["-a"] if all else []), "--filter",
                    f"label={WORLD_LABEL}={self.id}", "--format", "{{.Names}}")
        return sorted(r.stdout.decode().split())

    async def sync(self) -> list[str]:
        """Apply moto's states to the machines (terminated: removed; stopped:
        killed). Returns the instance ids whose machines were removed."""
        return await anyio.to_thread.run_sync(self.reap)

    def reap(self) -> list[str]:
        """Blocking :meth:`sync`."""
        ids = [i for i, ep in self._endpoints.items() if ep.container is not None]
        if not ids:
            return []
        states = self._states(ids)
        removed = []
        for iid in ids:
            state = states.get(iid, "terminated")  # forgotten by moto (reset): gone
            if state in ("terminated", "shutting-down"):
                self._remove(self._endpoints[iid])
                removed.append(iid)
            elif state in ("stopping", "stopped"):
                self._stop(self._endpoints[iid])
        return removed

    def close(self) -> None:
        """Remove every container of this world and free its ports."""
        r = _docker(self.docker_host, "ps", "-aq", "--filter", f"label={WORLD_LABEL}={self.id}",
                    check=False)
        ids = r.stdout.decode().split()
        if ids:
            _docker(self.docker_host, "rm", "-f", *ids, check=False)
        for ep in self._endpoints.values():
            ep.container, ep.running = None, False
        for s in self._holders:
            s.close()
        self._holders.clear()
        self._ec2.close()

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    # internals (worker threads; one at a time per instance id)

    def _dead_port(self) -> int:
        """A port of 127.0.0.1 where connections are refused: bound, never
        listening, so that no free_port() is given it while the world lives."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        with self._mutex:
            self._holders.append(s)
        return int(s.getsockname()[1])

    def _hold(self, port: int) -> None:
        """Best effort: keep a freed sshd port refused (fails while TIME_WAIT)."""
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            return
        with self._mutex:
            self._holders.append(s)

    def _describe(self, iid: str) -> dict[str, Any]:
        r = self._ec2.describe_instances(InstanceIds=[iid])
        for res in r["Reservations"]:
            for inst in res["Instances"]:
                if inst["InstanceId"] == iid:
                    return dict(inst)
        raise WorldError(f"moto has no instance {iid}")

    def _states(self, ids: list[str]) -> dict[str, str]:
        states: dict[str, str] = {}
        pages = self._ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-id", "Values": ids}])
        for page in pages:
            for res in page["Reservations"]:
                for inst in res["Instances"]:
                    states[inst["InstanceId"]] = inst["State"]["Name"]
        return states

    def _take_fault(self) -> str | None:
        with self._mutex:
            return self._faults.popleft() if self._faults else None

    def _resolve(self, iid: str) -> Endpoint:
        inst = self._describe(iid)
        state = inst["State"]["Name"]
        ep = self._endpoints.get(iid)
        if state in ("terminated", "shutting-down"):
            if ep is None:
                return Endpoint(iid, self._nowhere, dead=True)
            self._remove(ep)
            return ep
        if state in ("stopping", "stopped"):
            if ep is None:
                return Endpoint(iid, self._nowhere)
            self._stop(ep)
            return ep
        if ep is None:
            fault = self._take_fault()
            if fault == "unreachable":
                ep = Endpoint(iid, self._dead_port(), fault=fault, dead=True)
                self._endpoints[iid] = ep
                return ep
            try:
                ep = self._create(inst, fault)
            except Exception as e:
                self.errors.append(f"{iid}: {e}")
                raise
            self._endpoints[iid] = ep
        elif not ep.running and not ep.dead and ep.container is not None:
            self._start(ep)
        return ep

    def _host_keys(self, iid: str, d: Path, fault: str | None) -> tuple[list[Path], str]:
        """Host key files for the instance's sshd and the public line it presents."""
        raw = self._ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        encoded = (raw.get("UserData") or {}).get("Value") or ""
        text = base64.b64decode(encoded).decode(errors="replace") if encoded else ""
        keys: list[tuple[str, str, str]] = []  # (kind, private, public)
        if text.startswith("#cloud-config"):
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise WorldError(f"{iid}: user data is not YAML: {e}") from e
            ssh_keys = data.get("ssh_keys") if isinstance(data, dict) else None
            if isinstance(ssh_keys, dict):
                for kind in ("ed25519", "ecdsa", "rsa"):
                    priv, pub = ssh_keys.get(f"{kind}_private"), ssh_keys.get(f"{kind}_public")
                    if isinstance(priv, str):
                        keys.append((kind, priv, str(pub or "")))
        if fault == "wrong_host_key" or not keys:
            line = keygen(d / "ssh_host_ed25519_key")
            return [d / "ssh_host_ed25519_key"], line
        paths, lines = [], []
        for kind, priv, pub in keys:
            p = d / f"ssh_host_{kind}_key"
            p.write_text(priv.strip() + "\n")
            p.chmod(0o600)
            derived = subprocess.run(["ssh-keygen", "-y", "-f", str(p)], capture_output=True,
                                     text=True, stdin=subprocess.DEVNULL)
            if derived.returncode != 0:
                raise WorldError(f"{iid}: {kind}_private of the user data is not a key: "
                                 f"{derived.stderr.strip()}")
            if pub and derived.stdout.split()[:2] != pub.split()[:2]:
                raise WorldError(f"{iid}: {kind}_public of the user data is not the public "
                                 f"half of {kind}_private")
            paths.append(p)
            lines.append(derived.stdout.strip())
        return paths, lines[0]

    def _authorized_keys(self, inst: dict[str, Any]) -> str:
        lines = [self.public_key]
        if name := inst.get("KeyName"):
            with contextlib.suppress(Exception):
                pairs = self._ec2.describe_key_pairs(KeyNames=[name], IncludePublicKey=True)
                lines += [str(p["PublicKey"]).strip() for p in pairs["KeyPairs"]
                          if p.get("PublicKey")]
        return "".join(f"{line}\n" for line in dict.fromkeys(lines))

    def _create(self, inst: dict[str, Any], fault: str | None) -> Endpoint:
        iid = str(inst["InstanceId"])
        d = self.root / iid
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        host_keys, host_line = self._host_keys(iid, d, fault)
        uid = _next_uid()
        name = f"vmpool-ec2-{iid}"
        for _attempt in range(3):  # a free port can be taken before sshd binds it
            port = free_port()
            files = self._machine_files(inst, host_keys, port, uid)
            for path, (data, _mode) in files.items():
                (d / os.path.basename(path)).write_bytes(data)
            # (a VM's root may make namespaces: the driver gives a job that
            # disables the network one of its own)
            r = _docker(self.docker_host, "create", "--name", name, "--network", "host",
                        "--cap-add", "SYS_ADMIN",
                        "--label", f"{WORLD_LABEL}={self.id}", "--label",
                        f"{INSTANCE_LABEL}={iid}", self.image, "/bin/sh", "/vmpool/boot.sh")
            ep = Endpoint(iid, port, container=r.stdout.decode().strip(), name=name, uid=uid,
                          host_key_line=host_line, fault=fault, dir=d)
            _docker(self.docker_host, "cp", "-", f"{name}:/", input=_tar(files))
            try:
                self._start(ep, fresh=True)
                return ep
            except WorldError as e:
                _docker(self.docker_host, "rm", "-f", name, check=False)
                if "Address already in use" not in str(e):
                    raise
        raise WorldError(f"{iid}: no free port for sshd after 3 tries")

    def _machine_files(self, inst: dict[str, Any], host_keys: list[Path], port: int,
                       uid: int) -> dict[str, tuple[bytes, int]]:
        config = (
            f"Port {port}\nListenAddress 127.0.0.1\n"
            + "".join(f"HostKey /vmpool/{p.name}\n" for p in host_keys)
            + "PidFile /run/sshd.pid\nPermitRootLogin prohibit-password\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "AllowTcpForwarding no\nAllowStreamLocalForwarding no\nAllowAgentForwarding no\n"
            "X11Forwarding no\nPrintMotd no\nUseDNS no\nMaxStartups 100:30:200\n"
            "MaxSessions 50\nLoginGraceTime 30\nClientAliveInterval 0\nLogLevel INFO\n"
            + (f"Subsystem sftp {SFTP_SERVER}\n" if Path(SFTP_SERVER).exists() else "")
        )
        boot = f"""set -e
chmod 700 /vmpool
sed -i -E 's/^autograde:x:[0-9]+:[0-9]+:/autograde:x:{uid}:{uid}:/' /etc/passwd
sed -i -E 's/^autograde:x:[0-9]+:/autograde:x:{uid}:/' /etc/group
chown -R {uid}:{uid} /home/autograde
mkdir -p /run/sshd /root/.ssh
chmod 755 /run/sshd
chmod 700 /root/.ssh
cp /vmpool/authorized_keys /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
exec /usr/sbin/sshd -D -e -f /vmpool/sshd_config
"""
        files = {"/vmpool/boot.sh": (boot.encode(), 0o700),
                 "/vmpool/sshd_config": (config.encode(), 0o600),
                 "/vmpool/authorized_keys": (self._authorized_keys(inst).encode(), 0o600)}
        for p in host_keys:
            files[f"/vmpool/{p.name}"] = (p.read_bytes(), 0o600)
        return files

    def _start(self, ep: Endpoint, *, fresh: bool = False) -> None:
        """Start the machine and wait until its sshd listens (bounded)."""
        assert ep.container is not None
        marker = f"Server listening on 127.0.0.1 port {ep.port}"
        seen = 0  # how many times it listened before (a restart: wait for one more)
        if not fresh:
            before = _docker(self.docker_host, "logs", ep.container, check=False)
            seen = (before.stdout + before.stderr).decode(errors="replace").count(marker)
        _docker(self.docker_host, "start", ep.container)
        proc = subprocess.Popen(["docker", "logs", "-f", ep.container],
                                env={**os.environ, "DOCKER_HOST": self.docker_host},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        timer = threading.Timer(LISTEN_TIMEOUT, proc.kill)
        timer.start()
        log: list[str] = []
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                log.append(raw.decode(errors="replace").rstrip())
                if marker in log[-1]:
                    seen -= 1
                    if seen < 0:
                        ep.running = True
                        return
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
        state = _docker(self.docker_host, "inspect", "-f", "{{.State.Status}}",
                        ep.container, check=False).stdout.decode().strip()
        raise WorldError(f"{ep.instance_id}: sshd did not listen on port {ep.port} within "
                         f"{LISTEN_TIMEOUT:.0f} s (container {state}): " + " | ".join(log[-15:]))

    def _stop(self, ep: Endpoint) -> None:
        if ep.container is not None and ep.running:
            _docker(self.docker_host, "kill", ep.container, check=False)
            ep.running = False

    def _remove(self, ep: Endpoint) -> None:
        if ep.container is not None:
            _docker(self.docker_host, "rm", "-f", ep.container, check=False)
            ep.container, ep.running, ep.dead = None, False, True
            self._hold(ep.port)

    def _kill(self, iid: str) -> None:
        ep = self._endpoints.get(iid)
        if ep is None:
            raise WorldError(f"{iid} has no machine")
        self._remove(ep)

    def _cut(self, iid: str) -> int:
        ep = self._endpoints.get(iid)
        if ep is None or ep.container is None:
            raise WorldError(f"{iid} has no machine")
        script = ("n=0; for d in /proc/[0-9]*; do p=${d#/proc/}; [ \"$p\" = 1 ] && continue; "
                  "[ \"$(cat $d/comm 2>/dev/null)\" = sshd ] || continue; "
                  "kill -9 \"$p\" 2>/dev/null && n=$((n+1)); done; echo $n")
        r = _docker(self.docker_host, "exec", ep.container, "/bin/sh", "-c", script)
        return int(r.stdout.decode().strip() or 0)


# --- the API's faults -------------------------------------------------------


_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailers", "transfer-encoding", "upgrade", "content-length"}


@dataclass
class _Refusal:
    action: str
    code: str
    message: str
    status: int
    left: int
    spot_only: bool


@dataclass
class _ProxyState:
    refusals: list[_Refusal] = field(default_factory=list)
    delays: dict[str, float] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)


class FaultProxy:
    """An HTTP reverse proxy on 127.0.0.1 in front of ``target`` (moto's url)
    that forwards every request unchanged, except the ones told to fail or
    wait. Actions are those of the EC2 Query API (``Action=`` of the form
    body or the query string)."""

    def __init__(self, target: str) -> None:
        u = urllib.parse.urlsplit(target)
        self._target = (u.hostname or "127.0.0.1", u.port or 80)
        self._lock = threading.Lock()
        self._state = _ProxyState()
        self._closing = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="fault-proxy",
                                        daemon=True)
        self._thread.start()

    def refuse(self, action: str, code: str = "InsufficientInstanceCapacity", n: int = 1,
               spot_only: bool = False, *, message: str | None = None,
               status: int = 400) -> None:
        """Answer the next ``n`` ``action`` requests (only spot ones with
        ``spot_only``) with EC2's error XML for ``code``."""
        msg = message or f"{code} (refused by the test's FaultProxy)"
        with self._lock:
            self._state.refusals.append(_Refusal(action, code, msg, status, n, spot_only))

    def delay(self, action: str, seconds: float) -> None:
        """Make every ``action`` request wait ``seconds`` before it is answered
        (0: no more)."""
        with self._lock:
            if seconds > 0:
                self._state.delays[action] = seconds
            else:
                self._state.delays.pop(action, None)

    @property
    def refused(self) -> int:
        with self._lock:
            return sum(self._state.refused.values())

    def refused_of(self, action: str) -> int:
        with self._lock:
            return self._state.refused[action]

    def calls(self, action: str) -> int:
        """How many ``action`` requests were forwarded to moto."""
        with self._lock:
            return self._state.calls[action]

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        if b"=" in body and "json" not in h.headers.get("Content-Type", ""):
            params.update(urllib.parse.parse_qs(body.decode("latin-1")))
        action = (params.get("Action") or [""])[0]
        spot = (params.get("InstanceMarketOptions.MarketType") or [""])[0] == "spot"
        with self._lock:
            wait = self._state.delays.get(action, 0.0)
        if wait > 0:
            self._closing.wait(wait)  # the simulated latency of a slow API
        refusal = None
        with self._lock:
            for r in self._state.refusals:
                if r.left > 0 and r.action == action and (spot or not r.spot_only):
                    r.left -= 1
                    refusal = r
                    self._state.refused[action] += 1
                    break
            else:
                self._state.calls[action] += 1
        if refusal is not None:
            xml = ('<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
                   f"<Code>{refusal.code}</Code><Message>{refusal.message}</Message></Error>"
                   f"</Errors><RequestID>{uuid.uuid4()}</RequestID></Response>").encode()
            self._reply(h, refusal.status, [("Content-Type", "text/xml;charset=UTF-8")], xml)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(*self._target, timeout=120)
        try:
            conn.request(h.command, h.path, body=body if body else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            self._reply(h, resp.status, out, data, head=h.command == "HEAD")
        except OSError as e:
            self._reply(h, 502, [("Content-Type", "text/plain")], f"proxy: {e}".encode())
        finally:
            conn.close()

    @staticmethod
    def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    @staticmethod
    def _reply(h: http.server.BaseHTTPRequestHandler, status: int,
               headers: list[tuple[str, str]], data: bytes, head: bool = False) -> None:
        h.send_response_only(status)  # no Server/Date of its own: moto's are forwarded
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)


def driver_options(world: EC2World, ami: str, *, url: str | None = None,
                   image: str = "grader", **extra: Any) -> dict[str, Any]:
    """The EC2 driver's options for ``world``: moto (or ``url``, a proxy in
    front of it) as the endpoint, ``image`` -> ``ami``, the world's resolver
    and client key, root logins."""
    options: dict[str, Any] = {
        "endpoint_url": world.moto.url, "region": REGION, "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY, "images": {image: ami}, "resolver": world.resolve,
        "key_file": str(world.key_file), "ssh_user": "root", "poll_interval": 0.1,
        "connect_timeout": 5.0, "monitor_interval": 0.5, "instance_type": "t3.micro",
    }
    if url is not None:
        options["endpoint_url"] = url
    options.update(extra)
    return options
