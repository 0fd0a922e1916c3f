"""Docker hosts reached through SSH: one pool's warm containers on many hosts.

Each host is reached through ONE multiplexed asyncssh connection (keepalive,
connect and login timeouts). The host's Docker socket is forwarded to a
private unix socket here, and a :class:`~vmpool_drivers.docker.DockerVMMS`
speaks the Engine API through it: the job's one exec, its limits, labels
and OOM report are the Docker driver's, per host (composition). Containers
carry the host's name in a label and in their name, so one host's
reconciliation never touches another host's containers, even when two
"hosts" share an engine.

Placement: a new VM goes to the usable host with the largest share of its
room free (``max_vms`` slots, or ``cores`` and ``memory_mb``), ties to the
one with more room, then by name: 40 VMs on 4 equal hosts end 10/10/10/10,
and a host with half the room gets half the VMs. Only hosts that have the
VM's image (as their last listing said) are candidates.

A host that stops answering (keepalive lost, connection refused or closed)
is marked down at once: the pools are told its VMs are lost (idle ones leave
at once; jobs running there fail their try, ``host H unreachable``, and are
retried elsewhere), new VMs go to the other hosts, and the driver's
background work reconnects it with capped exponential backoff. Once it
answers again, the containers this manager left there are removed (the
same owner-label reconciliation as at start-up) and it takes VMs again.

Host keys are always verified against the host's ``known_hosts`` file: an
unknown or changed key is an error naming the host and the key's
fingerprint, never accepted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import aiohttp
import anyio
import asyncssh

from vmpool.errors import (
    CopyInError,
    DestroyVMError,
    InitializeVMError,
    NoRoomError,
    RunJobError,
    VMMSError,
    VMNotReadyError,
)
from vmpool.models import InputFile, TangoMachine
from vmpool.vmms import VMMS, safe_name

from ..docker import DockerVMMS

log = logging.getLogger("vmpool.ssh_docker")

T = TypeVar("T")

HostState = Literal["new", "up", "down"]


@dataclass(frozen=True)
class HostSpec:
    """One Docker host, as the driver's ``hosts`` option lists it."""

    name: str
    address: str
    user: str
    #: the client's private key file
    key: str
    #: the known_hosts file that holds the host's key (always checked)
    known_hosts: str
    port: int = 22
    #: room: at most this many VMs (default 4 when neither this nor
    #: cores/memory_mb is given)
    max_vms: int | None = None
    cores: int | None = None
    memory_mb: int | None = None
    #: the Docker socket on the host
    docker_socket: str = "/var/run/docker.sock"

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> HostSpec:
        """A host from its TOML/dict form; ValueError naming every problem."""
        name = str(raw.get("name") or raw.get("address") or "?")
        problems = []
        for k in ("name", "address", "user", "key", "known_hosts"):
            if not isinstance(raw.get(k), str) or not raw.get(k):
                problems.append(f"'{k}' must be a non-empty string")
        known = set(cls.__dataclass_fields__)
        problems += [f"unknown option {k!r}" for k in raw if k not in known]
        for k, least in (("port", 1), ("max_vms", 0), ("cores", 1), ("memory_mb", 1)):
            v = raw.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
                problems.append(f"'{k}' must be an int >= {least}, got {v!r}")
        if raw.get("max_vms") is not None and (raw.get("cores") or raw.get("memory_mb")):
            problems.append("give either 'max_vms' or 'cores' and 'memory_mb', not both")
        if problems:
            raise ValueError(f"ssh_docker host {name}: " + "; ".join(problems))
        return cls(**{k: raw[k] for k in raw})


@dataclass(eq=False)
class _Host:
    spec: HostSpec
    state: HostState = "new"
    draining: bool = False
    #: the connection's number: a VM made under an earlier one is gone
    epoch: int = 0
    conn: asyncssh.SSHClientConnection | None = None
    docker: DockerVMMS | None = None
    #: VMs placed here (being made or alive), by VM key
    vms: dict[str, TangoMachine] = field(default_factory=dict)
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    #: containers of an earlier connection to remove once it answers
    dirty: bool = False
    #: the images it has (None: not listed yet): a VM goes only where its image is
    images: set[str] | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name


class SSHDockerVMMS(VMMS):
    """The Docker driver over many hosts reached through SSH (see the module)."""

    driver_name: ClassVar[str] = "ssh_docker"

    def __init__(
        self,
        *,
        owner: str | None = None,
        prefix: str = "local",
        hosts: Sequence[Mapping[str, Any] | HostSpec] = (),
        keepalive_interval: float = 5.0,
        keepalive_count_max: int = 3,
        connect_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        exclusive: Sequence[str] = (),
        **docker_options: Any,
    ) -> None:
        super().__init__(owner=owner, prefix=prefix)
        specs = [h if isinstance(h, HostSpec) else HostSpec.parse(h) for h in hosts]
        if not specs:
            raise ValueError("ssh_docker: no hosts (option 'hosts')")
        names = [h.name for h in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"ssh_docker: host names must differ, got {names}")
        self._hosts: dict[str, _Host] = {h.name: _Host(h) for h in specs}
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        #: pools (by name) that get at most one VM per host
        self.exclusive = set(exclusive)
        self.docker_options = dict(docker_options)
        self.memory_mb = int(docker_options.get("memory_mb", 1024))
        self._sock_dir: Path | None = None
        self._wake = anyio.Event()

    # ------------------------------------------------------------ hosts

    def hosts(self) -> dict[str, dict[str, Any]]:
        """Per host: state (up, down, draining, new), VMs, last error."""
        return {
            h.name: {
                "state": "draining" if h.draining else h.state,
                "vms": len(h.vms),
                "room": self._room(h),
                "error": h.error,
            }
            for h in self._hosts.values()
        }

    def drain_host(self, name: str, draining: bool = True) -> None:
        """Drain host ``name``: no new VMs there, running jobs finish, then its
        VMs are destroyed (idle ones at once). ``draining=False`` undoes it."""
        h = self._host(name)
        h.draining = draining
        if not draining:
            self.report_room()
        if draining:
            log.info("ssh_docker: draining host %s (%d VMs)", name, len(h.vms))
            self.report_lost(list(h.vms.values()))

    def _host(self, name: str) -> _Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise ValueError(f"ssh_docker: no host {name!r} "
                             f"(hosts: {', '.join(self._hosts)})") from None

    def _room(self, h: _Host, vms: Sequence[TangoMachine] | None = None) -> int:
        """VMs of the default size the host has room for once ``vms`` (by
        default, those placed there) are on it; negative when they do not fit."""
        s = h.spec
        placed = list(h.vms.values()) if vms is None else vms
        if s.cores is None and s.memory_mb is None:
            return (4 if s.max_vms is None else s.max_vms) - len(placed)
        room = math.inf
        if s.cores is not None:
            room = min(room, s.cores - sum(vm.cores or 1 for vm in placed))
        if s.memory_mb is not None:
            used = sum(vm.memory or self.memory_mb for vm in placed)
            room = min(room, (s.memory_mb - used) // self.memory_mb)
        return int(room)

    def _capacity(self, h: _Host) -> int:
        """Its room when empty."""
        return self._room(h, [])

    def _fits(self, h: _Host, vm: TangoMachine) -> bool:
        return self._room(h, [*h.vms.values(), vm]) >= 0

    def placement(self, vm: TangoMachine) -> list[_Host]:
        """The hosts ``vm`` may go to, best first (see the module docstring)."""
        candidates = [
            h for h in self._hosts.values()
            # a host that is down is the background work's to reconnect:
            # no creation waits on it
            if not h.draining and h.state != "down" and self._fits(h, vm)
            and (h.images is None or vm.image in h.images)
            and not (vm.name in self.exclusive
                     and any(v.name == vm.name for v in h.vms.values()))
        ]

        def rank(h: _Host) -> tuple[float, int, str]:
            cap = max(self._capacity(h), 1)
            return (-self._room(h) / cap, -self._room(h), h.name)

        return sorted(candidates, key=rank)

    def _key(self, vm: TangoMachine) -> str:
        return f"{self.owner}/{self.instanceName(vm.id, vm.name)}"

    def _placed(self, vm: TangoMachine) -> tuple[_Host, DockerVMMS]:
        """The host a VM lives on, and its engine's driver, if it answers."""
        name = vm.driver_data.get("host")
        h = self._hosts.get(str(name)) if name else None
        if h is None:
            raise VMNotReadyError(f"VM {vm.id} is on no known host")
        if h.state != "up" or h.docker is None or vm.driver_data.get("epoch") != h.epoch:
            raise VMNotReadyError(f"host {h.name} unreachable ({h.error or 'down'})")
        return h, h.docker

    async def _connect(self, h: _Host) -> None:
        """Connect to ``h`` (one connection, its Docker socket forwarded)."""
        s = h.spec
        driver = self

        class Client(asyncssh.SSHClient):
            def connection_lost(self, exc: Exception | None) -> None:
                if conn_box[0] is not None and h.conn is conn_box[0]:
                    driver._down(h, f"connection lost: {exc or 'closed'}")

        conn_box: list[asyncssh.SSHClientConnection | None] = [None]
        try:
            with anyio.fail_after(self.connect_timeout):
                conn = await asyncssh.connect(
                    s.address, s.port, username=s.user, client_keys=[s.key],
                    known_hosts=s.known_hosts, agent_path=None, config=None,
                    keepalive_interval=self.keepalive_interval,
                    keepalive_count_max=self.keepalive_count_max,
                    login_timeout=self.connect_timeout, client_factory=Client,
                )
        except asyncssh.HostKeyNotVerifiable as e:
            fingerprint = await self._fingerprint(s)
            raise ConnectionError(
                f"host {s.name} ({s.address}:{s.port}): its host key {fingerprint} is not the "
                f"one in {s.known_hosts} (unknown or changed): {e.reason}") from None
        except asyncssh.PermissionDenied as e:
            raise ConnectionError(
                f"host {s.name} ({s.address}:{s.port}): login as {s.user} with key {s.key} "
                f"refused: {e.reason}") from None
        except TimeoutError:
            raise ConnectionError(f"host {s.name} ({s.address}:{s.port}): no answer within "
                                  f"{self.connect_timeout:g} s") from None
        except (OSError, asyncssh.Error) as e:
            raise ConnectionError(f"host {s.name} ({s.address}:{s.port}): "
                                  f"{getattr(e, 'reason', None) or e}") from None
        conn_box[0] = conn
        try:
            sock = self._socket_path(h)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            with anyio.fail_after(self.connect_timeout):
                await conn.forward_local_path(str(sock), s.docker_socket)
        except (OSError, asyncssh.Error, TimeoutError) as e:
            conn.close()
            raise ConnectionError(f"host {s.name}: forwarding its Docker socket "
                                  f"{s.docker_socket}: {e}") from None
        old = h.docker
        h.epoch += 1
        h.conn = conn
        h.docker = DockerVMMS(owner=self.owner, prefix=self.prefix, url=f"unix://{sock}",
                              host=s.name, vmms_name=self.driver_name, **self.docker_options)
        h.state, h.error, h.failures = "up", None, 0
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        log.info("ssh_docker: host %s up (%s:%d)", s.name, s.address, s.port)

    async def _fingerprint(self, s: HostSpec) -> str:
        try:
            with anyio.fail_after(self.connect_timeout):
                key = await asyncssh.get_server_host_key(s.address, s.port)
        except (OSError, asyncssh.Error, TimeoutError):
            return "(not read)"
        return key.get_fingerprint() if key is not None else "(none offered)"

    def _socket_path(self, h: _Host) -> Path:
        if self._sock_dir is None:
            self._sock_dir = Path(tempfile.mkdtemp(prefix="vmpool-ssh-"))
            os.chmod(self._sock_dir, 0o700)
        return self._sock_dir / f"{safe_name(h.name)}-{h.epoch + 1}.sock"

    def _failed(self, h: _Host, why: str) -> None:
        """``h`` is down for ``why``; the next try after a capped, doubling backoff."""
        h.state, h.error = "down", why
        h.failures += 1
        h.retry_at = time.monotonic() + min(
            self.backoff_max, self.backoff_initial * 2 ** min(h.failures - 1, 30))

    def _down(self, h: _Host, why: str) -> None:
        """Mark ``h`` down: its VMs are lost, it is retried with backoff."""
        if h.state == "down":
            return
        self._failed(h, why)
        h.dirty = True
        lost = list(h.vms.values())
        h.vms.clear()
        if h.conn is not None:
            h.conn.close()
        log.warning("ssh_docker: host %s down (%s); %d VMs lost", h.name, why, len(lost))
        self.report_lost(lost)
        self._wake.set()

    async def _ensure_up(self, h: _Host) -> None:
        async with h.lock:
            if h.state == "up":
                return
            try:
                await self._connect(h)
            except ConnectionError as e:
                self._failed(h, str(e))
                raise
            if h.dirty:
                await self._clean(h)
        self.report_room()  # a host answers again: pools waiting for room try now

    async def _clean(self, h: _Host) -> None:
        """Remove what this manager left on ``h`` under an earlier connection."""
        assert h.docker is not None
        try:
            with anyio.fail_after(self.connect_timeout * 3):
                live = {v.instance_id for v in h.vms.values()}
                left = [vm for vm in await h.docker.getVMs() if vm.instance_id not in live]
                for vm in left:
                    await h.docker.destroyVM(vm)
        except (Exception, TimeoutError) as e:
            log.warning("ssh_docker: host %s: removing leftover containers: %s", h.name, e)
            return
        h.dirty = False
        if left:
            log.info("ssh_docker: host %s: removed %d leftover containers", h.name, len(left))

    async def background(self) -> None:
        """Reconnect hosts that are down, with backoff, until cancelled."""
        while True:
            now = time.monotonic()
            down = [h for h in self._hosts.values() if h.state == "down"]
            for h in down:
                if now >= h.retry_at:
                    with contextlib.suppress(ConnectionError):
                        await self._ensure_up(h)
            down = [h for h in self._hosts.values() if h.state == "down"]
            self._wake = anyio.Event()
            wait = min((h.retry_at for h in down), default=math.inf) - time.monotonic()
            with anyio.move_on_after(max(0.05, wait) if down else math.inf):
                await self._wake.wait()

    async def _call(self, vm: TangoMachine, error: type[VMMSError],
                    fn: Callable[[DockerVMMS], Awaitable[T]]) -> T:
        """``fn`` on the VM's host's driver; a host gone meanwhile is a
        typed error naming it (the try is retried elsewhere)."""
        h, docker = self._placed(vm)
        try:
            return await fn(docker)
        except VMMSError:
            if h.state != "up":
                raise error(f"host {h.name} unreachable ({h.error})") from None
            raise
        except (OSError, asyncssh.Error, ConnectionError, aiohttp.ClientError) as e:
            self._down(h, f"{type(e).__name__}: {e}")
            raise error(f"host {h.name} unreachable ({e})") from e
        except Exception as e:
            if h.state != "up":
                raise error(f"host {h.name} unreachable ({h.error})") from e
            raise

    # ----------------------------------------------------------- VMMS

    async def _each_host(self, what: str,
                         fn: Callable[[DockerVMMS], Awaitable[T]]) -> dict[str, T]:
        """``fn`` on every host that answers, side by side (a host that does
        not answer costs its connect timeout, once, not one per host); a
        host's failure is logged and leaves it out."""
        out: dict[str, T] = {}

        async def one(h: _Host) -> None:
            try:
                await self._ensure_up(h)
                assert h.docker is not None
                with anyio.fail_after(self.connect_timeout * 3):
                    out[h.name] = await fn(h.docker)
            except Exception as e:  # one host's failure is not the others'
                log.warning("ssh_docker: host %s: %s: %s", h.name, what, e)

        async with anyio.create_task_group() as tg:
            for h in self._hosts.values():
                tg.start_soon(one, h)
        return out

    async def getImages(self) -> list[str] | None:
        """The images the hosts that answer have (None if none answers)."""
        found = await self._each_host("listing images", lambda d: d.getImages())
        for name, images in found.items():
            self._hosts[name].images = set(images)
        if not found:
            return None
        return sorted(set().union(*found.values()))

    async def initializeVM(self, vm: TangoMachine) -> None:
        key = self._key(vm)
        problems: list[str] = []
        for h in self.placement(vm):
            h.vms[key] = vm  # placed (its room taken) while being made
            try:
                await self._ensure_up(h)
                assert h.docker is not None
                vm.driver_data.update(host=h.name, epoch=h.epoch)
                vm.domain_name = h.name
                await h.docker.initializeVM(vm)
                vm.vmms = self.driver_name
                return
            except ConnectionError as e:
                h.vms.pop(key, None)
                problems.append(str(e))
                continue
            except BaseException:
                h.vms.pop(key, None)
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    if h.docker is not None and h.state == "up":
                        with anyio.fail_after(30):
                            await h.docker.destroyVM(vm)
                raise
        detail = "; ".join(problems)
        if not any(h.state == "up" for h in self._hosts.values()):
            raise InitializeVMError(f"no host answers: {detail or 'all are down'}")
        # hosts answer but have no room: backpressure (the jobs wait), with
        # what the others said
        raise NoRoomError("no host can take the VM (all full, draining or down)"
                          + (f": {detail}" if detail else ""))

    async def waitVM(self, vm: TangoMachine, max_secs: float) -> None:
        await self._call(vm, VMNotReadyError, lambda d: d.waitVM(vm, max_secs))

    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        await self._call(vm, CopyInError, lambda d: d.copyIn(vm, inputFiles))

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        return await self._call(
            vm, RunJobError,
            lambda d: d.runJob(vm, runTimeout, maxOutputFileSize, disableNetwork))

    async def partialOutput(self, vm: TangoMachine) -> bytes | None:
        try:
            _, docker = self._placed(vm)
        except VMMSError:
            return None
        return await docker.partialOutput(vm)

    async def destroyVM(self, vm: TangoMachine) -> None:
        self.discard_feedback(vm)
        name = vm.driver_data.get("host")
        h = self._hosts.get(str(name)) if name else None
        if h is None:
            return
        h.vms.pop(self._key(vm), None)
        if h.state != "up" or h.docker is None or vm.driver_data.get("epoch") != h.epoch:
            # its host went down: what is left there is removed when it
            # answers again (h.dirty)
            h.dirty = True
            return
        try:
            await h.docker.destroyVM(vm)
        except (OSError, asyncssh.Error, ConnectionError, aiohttp.ClientError) as e:
            self._down(h, f"{type(e).__name__}: {e}")
        except DestroyVMError:
            if h.state == "up":
                raise

    async def getVMs(self) -> list[TangoMachine]:
        return self._located(await self._each_host("listing VMs", lambda d: d.getVMs()))

    async def getOrphans(self) -> list[TangoMachine]:
        return self._located(
            await self._each_host("listing orphans", lambda d: d.getOrphans()))

    def _located(self, found: dict[str, list[TangoMachine]]) -> list[TangoMachine]:
        """The VMs each host listed, marked with where they live."""
        vms = []
        for name, listed in found.items():
            h = self._hosts[name]
            for vm in listed:
                vm.driver_data.update(host=name, epoch=h.epoch)
                vm.domain_name = name
                vms.append(vm)
        return vms

    async def close(self) -> None:
        for h in self._hosts.values():
            if h.docker is not None:
                with contextlib.suppress(Exception):
                    await h.docker.close()
            if h.conn is not None:
                conn, h.conn = h.conn, None
                h.state = "new"
                conn.close()
                with anyio.move_on_after(5), contextlib.suppress(Exception):
                    await conn.wait_closed()
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
