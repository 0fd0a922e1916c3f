"""The EC2 driver: one instance per VM, reached over one SSH connection.

Async from end to end: one aiobotocore session and EC2 client per driver
(opened in the event loop at first use, closed at :meth:`EC2VMMS.close`),
one asyncssh connection per instance.

- **Tagged from birth.** ``run_instances`` carries the tags
  (``TagSpecifications``: owner, pool, VM id, image, the making process's
  liveness mark) in the same call, so no instance exists untagged, and a
  ``ClientToken``: the call is shielded from cancellation and bounded, and
  a retry of it can never make a second instance. :meth:`EC2VMMS.getVMs`
  lists by the owner tag (paginated); :meth:`EC2VMMS.getOrphans` returns
  instances whose maker is provably gone (see :mod:`vmpool_drivers.liveness`),
  which the manager's start-up reconciliation terminates.
- **No unknown host key is ever trusted.** Each instance gets a host key
  generated for it, installed by cloud-init from its user data
  (``ssh_keys``); the driver connects with that one key pinned
  (``known_hosts`` holds it alone) and refuses any other. Once the
  instance is up its metadata endpoint is turned off
  (``disable_metadata``): a job cannot read the user data (that key) nor an
  instance role's credentials.
- **One round trip a job**, as in the Docker driver (the tar and feedback
  code is shared, :mod:`vmpool_drivers.jobfiles`): copyIn writes the tar to
  a spool file; runJob is ONE SSH channel that unpacks it from its stdin and
  runs the autodriver as root (``sudo -n`` unless the SSH user is root)
  under a remote hard deadline (``timeout -s KILL``: SSH signals are not
  reliable) inside the caller's cancellation; the feedback comes back on the
  channel's stdout, capped, into a spool file that copyOut moves out; the
  exit code is the autodriver's. A connection lost during a job is a
  system error (RunJobError): the job is retried on another VM and this one
  destroyed. A job that disables the network (Tango's default) runs in a
  network namespace of its own (``unshare --net``: a loopback only, not
  the VPC nor the metadata address; ``isolate_network``).
- **Warm instances that cost less.** Besides the running warm VMs every
  pool keeps, ``stopped_warm = {pool: N}`` keeps N instances of a pool
  *stopped* (EBS only: only the disk is paid for): made, booted once (their
  key installed and SSH shown to work), stopped; initializeVM starts one
  (``start_instances``) before it runs a new one. :meth:`EC2VMMS.usage`
  gives the instance-hours used per pool, running and stopped apart.
- **Spot**: ``spot = True`` (or a list of pools) asks for spot capacity and
  falls back to on-demand when spot is refused; an interrupted spot
  instance fails its job as a system error (retried elsewhere), and the
  pool drops it (:meth:`~vmpool.vmms.VMMS.report_lost`).
- **Job-owned instances** (Tango's ``accessKeyId``/``accessKey``):
  :meth:`EC2VMMS.job_vm` makes an instance with the job's credentials (a
  client of its own), never pooled, always terminated after the job.

Errors are named once, clearly: a wrong credential, region or AMI fails
:meth:`EC2VMMS.getImages` (which the manager calls when it loads the
driver, so a server fails at start) and every initializeVM with the same
one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import asyncssh
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from autodriver import SOURCE as AUTODRIVER
from autodriver import arguments, env_arguments
from vmpool.config import KIB, MIB
from vmpool.errors import (
    CopyInError,
    DestroyVMError,
    InitializeVMError,
    NoRoomError,
    RunJobError,
    VMNotReadyError,
)
from vmpool.models import InputFile, TangoMachine, pool_name
from vmpool.vmms import EXIT_TIMEOUT, VMMS, Feedback, format_seconds
from vmpool_drivers import liveness
from vmpool_drivers.jobfiles import SpoolDir, drop_spooled, send_file

log = logging.getLogger(__name__)

TAG_OWNER = "vmpool:owner"
TAG_POOL = "vmpool:pool"
TAG_VM = "vmpool:vm"
TAG_IMAGE = "vmpool:image"
#: the process (and driver) that made the instance: see vmpool_drivers.liveness
TAG_PROCESS = "vmpool:process"
#: "pool" (a pool's VM), "stopped-warm" (a stopped warm instance), "job" (a
#: job-owned instance)
TAG_ROLE = "vmpool:role"

JOB_DIR = "home/autograde/autolab"
AUTODRIVER_IN_VM = "opt/vmpool/autodriver.py"
PARTIAL_IN_VM = "/opt/vmpool/partial"
#: exit code of the job's shell when the tar could not be unpacked
UNPACK_FAILED = 90
#: exit code of `timeout -s KILL` when it killed the autodriver
KILLED = 137
#: instance states after which an instance never runs again
GONE = ("shutting-down", "terminated")
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]

#: vCPUs and memory (MiB) of the instance types the default list names
INSTANCE_SIZES: dict[str, tuple[int, int]] = {
    "t3.nano": (2, 512), "t3.micro": (2, 1024), "t3.small": (2, 2048),
    "t3.medium": (2, 4096), "t3.large": (2, 8192), "t3.xlarge": (4, 16384),
    "t3.2xlarge": (8, 32768), "c5.large": (2, 4096), "c5.xlarge": (4, 8192),
    "c5.2xlarge": (8, 16384), "c5.4xlarge": (16, 32768), "m5.large": (2, 8192),
    "m5.xlarge": (4, 16384), "m5.2xlarge": (8, 32768),
}
DEFAULT_TYPES = ("t3.micro", "t3.small", "t3.medium", "t3.large", "t3.xlarge", "t3.2xlarge")

#: error codes that mean "your credentials (or their rights) are wrong"
AUTH_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "OptInRequired", "Blocked", "InvalidAccessKeyId", "AccessDenied",
})
#: error codes of a refusal for want of capacity or quota
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "VcpuLimitExceeded",
    "InsufficientCapacity", "InsufficientHostCapacity", "InsufficientFreeAddressesInSubnet",
    "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow", "UnfulfillableCapacity",
    "InsufficientReservedInstanceCapacity",
})
SPOT_MARKET = {"MarketType": "spot", "SpotOptions": {
    "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}

#: seconds after a VM is adopted before the watch may call it interrupted
WATCH_GRACE = 30.0
#: the most one run_instances may take (botocore's retries included)
RUN_LIMIT = 300.0

Resolver = Callable[[dict[str, Any]], Awaitable[tuple[str, int]]]


def user_data(host_key: asyncssh.SSHKey) -> str:
    """The instance's user data: cloud-init installs ``host_key`` as its
    only SSH host key (and makes none of its own)."""
    private = host_key.export_private_key("openssh").decode()
    public = host_key.export_public_key("openssh").decode().strip()
    pem = "".join(f"    {line}\n" for line in private.splitlines())
    return ("#cloud-config\nssh_deletekeys: true\nssh_genkeytypes: []\nssh_keys:\n"
            f"  ed25519_private: |\n{pem}  ed25519_public: {public}\n")


def _code(e: BaseException) -> str:
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code") or "")
    return ""


def _tag(inst: Mapping[str, Any], key: str) -> str | None:
    for t in inst.get("Tags") or []:
        if t.get("Key") == key:
            return str(t.get("Value"))
    return None


@dataclasses.dataclass
class _Usage:
    """Seconds a pool's instances spent running and stopped."""

    running: float = 0.0
    stopped: float = 0.0


@dataclasses.dataclass
class _Instance:
    """What the driver knows of one instance it made (for usage and for the
    interruption watch)."""

    iid: str
    pool: str
    state: str  # "running" or "stopped" (as far as billing goes)
    since: float
    spot: bool = False
    vm: TangoMachine | None = None
    interrupted: str | None = None
    #: "pool", "stopped-warm" (the driver's own stock) or "job"
    role: str = "pool"
    #: monotonic time it was (re)adopted as a VM: the watch gives EC2's
    #: eventually consistent listings a grace period after it
    adopted: float = 0.0


class EC2VMMS(VMMS):
    driver_name: ClassVar[str] = "ec2"
    job_owned_vms: ClassVar[bool] = True
    checked_at_start: ClassVar[bool] = True

    def __init__(
        self,
        *,
        owner: str | None = None,
        prefix: str = "local",
        images: Mapping[str, str] | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        instance_type: str | None = None,
        instance_types: Sequence[str] = DEFAULT_TYPES,
        instance_sizes: Mapping[str, tuple[int, int]] | None = None,
        subnet_id: str | None = None,
        security_group_ids: Sequence[str] = (),
        key_name: str | None = None,
        key_file: str | None = None,
        ssh_user: str = "admin",
        ssh_port: int = 22,
        use_private_ip: bool = False,
        resolver: Resolver | None = None,
        max_instances: int = 20,
        stopped_warm: Mapping[str, int] | None = None,
        spot: bool | Sequence[str] = False,
        grading_user: str = "autograde",
        nproc: int = 100,
        fsize: int = 100 * MIB,
        cpu_seconds: int = 0,
        env: Mapping[str, str] | None = None,
        seccomp: bool = True,
        feedback_cap: int = 64 * MIB,
        spool_dir: str | None = None,
        connect_timeout: float = 10.0,
        poll_interval: float = 1.0,
        terminate_timeout: float = 300.0,
        hard_deadline_grace: float = 2.0,
        monitor_interval: float = 5.0,
        disable_metadata: bool = True,
        isolate_network: bool = True,
        api_attempts: int = 3,
        memory_mb: int = 1024,
    ) -> None:
        super().__init__(owner=owner, prefix=prefix)
        #: image name (a pool's) -> AMI id
        self.images = dict(images or {})
        self.region = region
        self.endpoint_url = endpoint_url
        self.profile = profile
        self._credentials = (access_key_id, secret_access_key)
        self.sizes = {**INSTANCE_SIZES, **(instance_sizes or {})}
        if instance_type is not None:
            instance_types = [instance_type]
        unknown = [t for t in instance_types if t not in self.sizes]
        if unknown:
            raise ValueError(f"instance types of unknown size: {', '.join(unknown)} "
                             "(give their (vCPUs, MiB) in instance_sizes)")
        if not instance_types:
            raise ValueError("no instance type: give instance_type or instance_types")
        #: smallest first
        self.instance_types = sorted(instance_types, key=lambda t: (self.sizes[t][1],
                                                                    self.sizes[t][0]))
        self.max_cores = max(self.sizes[t][0] for t in self.instance_types)
        self.max_memory_mb = max(self.sizes[t][1] for t in self.instance_types)
        self.memory_mb = memory_mb
        self.subnet_id = subnet_id
        self.security_group_ids = list(security_group_ids)
        self.key_name = key_name
        self.key_file = key_file
        self._client_key: asyncssh.SSHKey | None = None
        self.ssh_user = ssh_user
        self.ssh_port = ssh_port
        self.use_private_ip = use_private_ip
        self.resolver = resolver
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        self.max_instances = max_instances
        self.stopped_warm = dict(stopped_warm or {})
        if any(n < 0 for n in self.stopped_warm.values()):
            raise ValueError(f"stopped_warm counts must be >= 0, got {self.stopped_warm}")
        self.spot = spot
        self.grading_user = grading_user
        self.nproc = nproc
        self.fsize = fsize
        self.cpu_seconds = cpu_seconds
        self.env = dict(env or {})
        env_arguments(self.env)  # checked now: a bad name fails at start, not per job
        self.seccomp = seccomp
        self.feedback_cap = feedback_cap
        self.connect_timeout = connect_timeout
        self.poll_interval = poll_interval
        self.terminate_timeout = terminate_timeout
        self.hard_deadline_grace = hard_deadline_grace
        self.monitor_interval = monitor_interval
        self.disable_metadata = disable_metadata
        #: a job that disables the network (Tango's default) runs in a
        #: network namespace of its own (``unshare --net``): only a loopback
        self.isolate_network = isolate_network
        self.api_attempts = api_attempts
        self.spool = SpoolDir(spool_dir, "vmpool-ec2-")
        self._autodriver = AUTODRIVER.read_bytes()
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._client_lock = anyio.Lock()
        self._nonce = uuid.uuid4().hex[:12]
        liveness.register(self._nonce)
        self._mark = liveness.process_mark(self._nonce)
        #: instance id -> its open SSH connection
        self._conns: dict[str, asyncssh.SSHClientConnection] = {}
        #: instances this driver made and has not seen terminated
        self._instances: dict[str, _Instance] = {}
        #: run_instances calls in flight (they count against max_instances)
        self._launching = 0
        #: pool name -> stopped warm instances ready to start (id -> (host
        #: key, instance type))
        self._stock: dict[str, dict[str, tuple[str, str]]] = {}
        self._stocking: dict[str, int] = {}
        #: each stock keeper's wake-up (an instance taken, room freed)
        self._stock_events: dict[str, anyio.Event] = {}
        self._usage: dict[str, _Usage] = {}
        #: counters for status and tests
        self.counters: dict[str, int] = {
            "run_instances": 0, "start_instances": 0, "terminated": 0,
            "spot_fallbacks": 0, "interrupted": 0}

    # ----------------------------------------------------------- the client

    async def _open_client(self, stack: contextlib.AsyncExitStack,
                           credentials: tuple[str | None, str | None]) -> Any:
        """An EC2 client, closed with ``stack``. Credentials: the given pair,
        else boto's chain (environment, shared files, ``profile``)."""
        key_id, secret = credentials
        session: AioSession = (AioSession(profile=self.profile)
                               if self.profile and key_id is None else get_session())
        kwargs: dict[str, Any] = {
            "region_name": self.region, "endpoint_url": self.endpoint_url,
            "config": AioConfig(retries={"max_attempts": self.api_attempts, "mode": "standard"},
                                connect_timeout=self.connect_timeout, read_timeout=60),
        }
        if key_id is not None:
            kwargs.update(aws_access_key_id=key_id, aws_secret_access_key=secret)
        try:
            regions = await session.get_available_regions("ec2")
            if self.region is not None and regions and self.region not in regions:
                # (a typo would otherwise be a connection error per call, or a
                # compatible endpoint's odd answer)
                raise InitializeVMError(f"EC2: unknown region {self.region!r} (known: "
                                        f"{', '.join(sorted(regions))})")
            return await stack.enter_async_context(session.create_client("ec2", **kwargs))
        except BotoCoreError as e:  # no region, a profile that does not exist, ...
            raise InitializeVMError(f"EC2: {e}") from e

    async def _ec2(self) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._open_client(self._stack, self._credentials)
        return self._client

    def _where(self) -> str:
        return f"region {self.region or '(default)'}" + (
            f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _explain(self, e: Exception, doing: str) -> str:
        """One clear line for an EC2 API failure."""
        code = _code(e)
        if code in AUTH_CODES:
            return (f"EC2 refused the credentials while {doing} ({code}, {self._where()}): "
                    "check the access key, the secret and their rights")
        if isinstance(e, ClientError):
            msg = e.response.get("Error", {}).get("Message") or str(e)
            return f"EC2 {doing}: {code}: {msg}"
        return f"EC2 {doing} ({self._where()}): {type(e).__name__}: {e}"

    async def close(self) -> None:
        # The stopped warm stock is the driver's own (no pool holds it): it
        # goes. A pool's instances are the pool's to destroy (a driver
        # closed under them is a crash, and the next reconciliation's).
        # (also those still being made: the background work that made them
        # was cancelled just before)
        leftovers = [iid for iid, rec in self._instances.items() if rec.role == "stopped-warm"]
        if leftovers and self._client is not None:
            await self._terminate(self._client, leftovers, "the driver closing")
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        liveness.unregister(self._nonce)
        if self.spool.made:
            await anyio.to_thread.run_sync(self.spool.remove)
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        self._client = None
        with anyio.CancelScope(shield=True):
            await stack.aclose()

    # ----------------------------------------------------------- images, types

    async def getImages(self) -> list[str]:
        """The configured images whose AMI exists; checks the credentials,
        the region and every AMI with one call."""
        if not self.images:
            return []
        client = await self._ec2()
        amis = sorted(set(self.images.values()))
        try:
            found = await client.describe_images(ImageIds=amis)
        except Exception as e:  # botocore's parser errors are bare Exceptions
            if _code(e).startswith("InvalidAMIID") and isinstance(e, ClientError):
                images = ", ".join(f"{k}={v}" for k, v in self.images.items())
                raise InitializeVMError(
                    f"EC2: AMIs not found in {self._where()} (images: {images}): "
                    f"{e.response.get('Error', {}).get('Message', '')}") from e
            raise InitializeVMError(self._explain(e, "describing the AMIs")) from e
        have = {img["ImageId"] for img in found.get("Images", [])}
        missing = [f"{name} ({ami})" for name, ami in self.images.items() if ami not in have]
        if missing:
            raise InitializeVMError(f"EC2: AMIs not found in {self._where()}: "
                                    f"{', '.join(missing)}")
        return sorted(self.images)

    def _ami(self, image: str) -> str:
        ami = self.images.get(image)
        if ami is None:
            raise InitializeVMError(f"EC2: no AMI configured for image {image!r} "
                                    f"(option images: {sorted(self.images)})")
        return ami

    def instance_type_for(self, vm: TangoMachine) -> str:
        """The smallest configured type with the VM's cores and memory."""
        cores, memory = vm.cores or 1, vm.memory or 0
        for t in self.instance_types:
            c, m = self.sizes[t]
            if c >= cores and m >= memory:
                return t
        raise InitializeVMError(f"EC2: no instance type of {self.instance_types} has "
                                f"{cores} vCPUs and {memory} MiB")

    def _wants_spot(self, pool: str) -> bool:
        if isinstance(self.spot, bool):
            return self.spot
        return pool in self.spot

    # ----------------------------------------------------------- usage

    def _record(self, iid: str, pool: str, state: str, *, spot: bool = False,
                vm: TangoMachine | None = None, role: str | None = None) -> None:
        now = time.monotonic()
        rec = self._instances.get(iid)
        if rec is None:
            rec = self._instances[iid] = _Instance(iid, pool, state, now, spot, vm)
        else:
            self._charge(rec, now)
            rec.state, rec.pool = state, pool
            if vm is not None:
                rec.vm, rec.interrupted = vm, None
        if vm is not None:
            rec.adopted = now
        if role is not None:
            rec.role = role

    def _charge(self, rec: _Instance, now: float) -> None:
        use = self._usage.setdefault(rec.pool, _Usage())
        if rec.state == "running":
            use.running += now - rec.since
        else:
            use.stopped += now - rec.since
        rec.since = now

    def _gone(self, iid: str) -> None:
        """Forget an instance EC2 has agreed to terminate."""
        rec = self._instances.pop(iid, None)
        if rec is not None:
            self._charge(rec, time.monotonic())
            self.counters["terminated"] += 1
        for stock in self._stock.values():
            stock.pop(iid, None)
        self._hang_up(iid)
        self._wake_stock()

    def _hang_up(self, iid: str) -> None:
        """Close the instance's SSH connection, if it has one (a job on it
        fails as a lost connection)."""
        conn = self._conns.pop(iid, None)
        if conn is not None:
            conn.close()

    def _wake_stock(self) -> None:
        """Wake every stock keeper: an instance was taken, or room freed."""
        for event in self._stock_events.values():
            event.set()

    async def _terminate(self, client: Any, iids: list[str], why: str) -> bool:
        """Terminate ``iids`` (shielded, bounded, retried); forget them once
        EC2 agreed. False (each one logged) if it never did: they stay
        known, and tagged for the next reconciliation."""
        problem = "no answer in 60 s"
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            for attempt in range(3):
                try:
                    await client.terminate_instances(InstanceIds=iids)
                except ClientError as e:
                    if _code(e).startswith("InvalidInstanceID"):
                        break  # never made, or gone
                    problem = self._explain(e, "terminate_instances")
                except Exception as e:  # botocore's bare parser errors too
                    problem = f"{type(e).__name__}: {e}"
                else:
                    break
                await anyio.sleep(min(10.0, self.poll_interval * 4 ** attempt))
            else:
                log.error("ec2: instances %s not terminated (%s): %s", ", ".join(iids), why,
                          problem)
                return False
            for iid in iids:
                self._gone(iid)
            return True
        log.error("ec2: instances %s not terminated (%s): %s", ", ".join(iids), why, problem)
        return False

    def usage(self) -> dict[str, dict[str, float]]:
        """Instance-hours used so far per pool, running and stopped apart
        (what a term costs is these times the prices), and the instances
        now running and stopped."""
        now = time.monotonic()
        out: dict[str, dict[str, float]] = {}
        for pool, use in self._usage.items():
            out[pool] = {"running_hours": use.running / 3600,
                         "stopped_hours": use.stopped / 3600, "running": 0, "stopped": 0}
        for rec in self._instances.values():
            entry = out.setdefault(rec.pool, {"running_hours": 0.0, "stopped_hours": 0.0,
                                              "running": 0, "stopped": 0})
            key = "running" if rec.state == "running" else "stopped"
            entry[f"{key}_hours"] += (now - rec.since) / 3600
            entry[key] += 1
        return out

    # ----------------------------------------------------------- launching

    def _tags(self, vm: TangoMachine, role: str) -> list[dict[str, str]]:
        return [
            {"Key": "Name", "Value": self.instanceName(vm.id, vm.name)},
            {"Key": TAG_OWNER, "Value": self.owner},
            {"Key": TAG_POOL, "Value": vm.name},
            {"Key": TAG_VM, "Value": str(vm.id)},
            {"Key": TAG_IMAGE, "Value": vm.image or ""},
            {"Key": TAG_PROCESS, "Value": self._mark},
            {"Key": TAG_ROLE, "Value": role},
        ]

    async def _launch(self, client: Any, vm: TangoMachine, role: str) -> tuple[str, str, bool]:
        """Run one instance for ``vm``: (instance id, its host key, spot)."""
        ami = self._ami(vm.image or "")
        itype = self.instance_type_for(vm)
        key = asyncssh.generate_private_key("ssh-ed25519")
        public = key.export_public_key("openssh").decode().strip()
        tags = self._tags(vm, role)
        params: dict[str, Any] = {
            "ImageId": ami, "InstanceType": itype, "MinCount": 1, "MaxCount": 1,
            "UserData": user_data(key),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags}],
            "InstanceInitiatedShutdownBehavior": "terminate" if role != "stopped-warm"
            else "stop",
        }
        if self.key_name:
            params["KeyName"] = self.key_name
        if self.subnet_id:
            params["SubnetId"] = self.subnet_id
        if self.security_group_ids:
            params["SecurityGroupIds"] = self.security_group_ids
        spot = self._wants_spot(vm.name) and role != "stopped-warm"  # spot cannot stop
        if spot:
            try:
                return await self._run_instances(client, {**params,
                                                          "InstanceMarketOptions": SPOT_MARKET},
                                                 public, True)
            except InitializeVMError as e:
                if not isinstance(e.__cause__, ClientError) or _code(
                        e.__cause__) not in CAPACITY_CODES:
                    raise
                self.counters["spot_fallbacks"] += 1
                log.info("ec2: spot capacity refused for pool %s (%s): on-demand instead",
                         vm.name, _code(e.__cause__))
        return await self._run_instances(client, params, public, False)

    async def _run_instances(self, client: Any, params: dict[str, Any], public: str,
                             spot: bool) -> tuple[str, str, bool]:
        # Not cancellable half-way: a call cut off after EC2 made the instance
        # would leave one nobody knows the id of (its tags would show it to
        # the next reconciliation, but not before). Bounded; the client token
        # makes botocore's own retries idempotent.
        self.counters["run_instances"] += 1
        token = uuid.uuid4().hex
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(RUN_LIMIT):
                answer = await client.run_instances(ClientToken=token, **params)
        except TimeoutError:
            # EC2 may have made it all the same: whatever has this token goes
            await self._terminate_token(client, token)
            raise InitializeVMError(f"EC2 run_instances: no answer in {RUN_LIMIT:g} s "
                                    f"({self._where()})") from None
        except (ClientError, BotoCoreError) as e:
            code = _code(e)
            if code.startswith("InvalidAMIID"):
                raise InitializeVMError(
                    f"EC2: AMI {params['ImageId']} does not exist in {self._where()}") from e
            what = "run_instances" + (" (spot)" if spot else "")
            if code in CAPACITY_CODES:
                raise InitializeVMError(
                    f"EC2 refused {what} for want of capacity or quota: {code}: "
                    f"{e.response.get('Error', {}).get('Message', '')}"
                ) from e
            raise InitializeVMError(self._explain(e, what)) from e
        except Exception as e:  # botocore's bare parser errors
            raise InitializeVMError(self._explain(e, "run_instances")) from e
        inst = answer["Instances"][0]
        return str(inst["InstanceId"]), public, spot

    async def _terminate_token(self, client: Any, token: str) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            try:
                found = await self._list(client, [{"Name": "client-token", "Values": [token]}])
            except Exception as e:
                log.error("ec2: a run_instances that timed out (client token %s) may have "
                          "made an instance, and listing it failed: %s", token, e)
                return
            iids = [str(i["InstanceId"]) for i in found]
            if iids:
                await self._terminate(client, iids, "its run_instances timed out")

    async def initializeVM(self, vm: TangoMachine) -> None:
        if not vm.image:
            raise InitializeVMError("the VM names no image")
        self._ami(vm.image)
        self.instance_type_for(vm)
        liveness.register(self._nonce)  # (again, for a driver used after close)
        client = await self._ec2()
        itype = self.instance_type_for(vm)
        stock = self._stock.get(vm.name, {})
        while (iid := next((i for i, (_, t) in stock.items() if t == itype), None)):
            public, _ = stock.pop(iid)
            self._wake_stock()
            if await self._start_stopped(client, vm, iid, public):
                return
        if len(self._instances) + self._launching >= self.max_instances:
            raise NoRoomError(f"EC2: {self.max_instances} instances already (max_instances)")
        self._launching += 1
        try:
            iid, public, spot = await self._launch(client, vm, "pool")
        finally:
            self._launching -= 1
        self._adopt(vm, iid, public, spot)

    def _adopt(self, vm: TangoMachine, iid: str, public: str, spot: bool,
               role: str = "pool") -> None:
        vm.instance_id = iid
        vm.ec2_id = iid
        vm.driver_data.update(iid=iid, host_key=public, spot=spot)
        self._record(iid, vm.name, "running", spot=spot, vm=vm, role=role)

    async def _start_stopped(self, client: Any, vm: TangoMachine, iid: str,
                             public: str) -> bool:
        """Start a stopped warm instance as ``vm``; False if it could not be.
        The VM is the instance from the first await on: a cancellation or
        failure from here is the pool's to destroy (destroyVM), never a leak."""
        self.counters["start_instances"] += 1
        self._adopt(vm, iid, public, False)
        vm.driver_data["was_stopped"] = True
        try:
            await client.create_tags(Resources=[iid], Tags=self._tags(vm, "pool"))
            await client.start_instances(InstanceIds=[iid])
        except Exception as e:
            log.warning("ec2: stopped warm instance %s could not be started (%s); "
                        "terminating it", iid, self._explain(e, "start_instances"))
            if not await self._terminate(client, [iid], "it could not be started"):
                # still there: the pool destroys the VM (it is this instance)
                raise InitializeVMError(f"stopped warm instance {iid} could not be "
                                        f"started: {e}") from e
            for key in ("iid", "host_key", "was_stopped"):
                vm.driver_data.pop(key, None)
            vm.instance_id = vm.ec2_id = None
            return False
        return True

    # ----------------------------------------------------------- reaching it

    async def _describe(self, client: Any, iid: str) -> dict[str, Any] | None:
        try:
            answer = await client.describe_instances(InstanceIds=[iid])
        except ClientError as e:
            if _code(e).startswith("InvalidInstanceID"):
                return None
            raise
        for r in answer.get("Reservations", []):
            for inst in r.get("Instances", []):
                return dict(inst)
        return None

    async def _wait_state(self, client: Any, iid: str, want: str) -> dict[str, Any]:
        """Describe the instance until its state is ``want`` (bounded by the
        caller's cancellation); VMNotReadyError if it can never be."""
        while True:
            try:
                inst = await self._describe(client, iid)
            except Exception as e:
                raise VMNotReadyError(self._explain(e, f"describing {iid}")) from e
            state = (inst or {}).get("State", {}).get("Name")
            if state == want:
                assert inst is not None
                return inst
            # (not found: EC2's listings are eventually consistent, a new
            # instance may not be in them yet; a terminated one stays listed)
            if state in GONE or (want == "running" and state == "stopped"
                                 and iid not in self._instances):
                reason = (inst or {}).get("StateReason", {}).get("Message", "")
                raise VMNotReadyError(f"instance {iid} is {state or 'gone'}"
                                      + (f": {reason}" if reason else ""))
            await anyio.sleep(self.poll_interval)

    async def _endpoint(self, inst: dict[str, Any]) -> tuple[str, int]:
        if self.resolver is not None:
            return await self.resolver(inst)
        address = (inst.get("PrivateIpAddress") if self.use_private_ip
                   else inst.get("PublicIpAddress") or inst.get("PrivateIpAddress"))
        if not address:
            raise VMNotReadyError(f"instance {inst.get('InstanceId')} has no IP address")
        return str(address), self.ssh_port

    def _key(self) -> asyncssh.SSHKey:
        if self._client_key is None:
            if not self.key_file:
                raise VMNotReadyError("EC2: no key_file: the driver cannot log in to instances")
            try:
                self._client_key = asyncssh.read_private_key(self.key_file)
            except (OSError, asyncssh.KeyImportError) as e:
                raise VMNotReadyError(f"EC2: key_file {self.key_file}: {e}") from e
        return self._client_key

    async def _connect(self, vm: TangoMachine, host: str, port: int,
                       key: asyncssh.SSHKey) -> asyncssh.SSHClientConnection:
        """Log in with the instance's own host key pinned; until it answers
        (sshd may not be up yet), bounded by the caller. A different host
        key is refused at once."""
        iid = vm.driver_data["iid"]
        pinned = asyncssh.import_public_key(vm.driver_data["host_key"])
        last = ""
        while True:
            try:
                with anyio.fail_after(self.connect_timeout):
                    return await asyncssh.connect(
                        host, port, username=self.ssh_user, client_keys=[key],
                        known_hosts=([pinned], [], []), x509_trusted_certs=None,
                        x509_trusted_cert_paths=None, agent_path=None, config=None,
                        keepalive_interval=15, keepalive_count_max=4,
                        login_timeout=self.connect_timeout,
                    )
            except asyncssh.HostKeyNotVerifiable as e:
                raise VMNotReadyError(
                    f"instance {iid} ({host}:{port}) showed a host key that is not the one "
                    f"made for it ({pinned.get_fingerprint()}): refused ({e.reason})") from None
            except asyncssh.PermissionDenied as e:
                raise VMNotReadyError(
                    f"instance {iid}: login as {self.ssh_user} with {self.key_file} refused: "
                    f"{e.reason}") from None
            except (OSError, asyncssh.Error, TimeoutError) as e:
                last = str(getattr(e, "reason", None) or e or type(e).__name__)
                vm.driver_data["last_ssh_error"] = last
            await anyio.sleep(self.poll_interval)

    def _root(self, command: str) -> str:
        """``command`` (a shell line) run as root on the instance."""
        if self.ssh_user == "root":
            return command
        return f"sudo -n sh -c {shlex.quote(command)}"

    async def waitVM(self, vm: TangoMachine, max_secs: float) -> None:
        iid = vm.driver_data.get("iid")
        if not iid:
            raise VMNotReadyError("the VM has no instance")
        conn = self._conns.get(iid)
        if conn is not None and not conn.is_closed():
            return
        client = vm.driver_data.get("client") or await self._ec2()
        inst = await self._wait_state(client, iid, "running")
        vm.domain_name = inst.get("PublicIpAddress") or inst.get("PrivateIpAddress")
        key = self._key()
        host, port = await self._endpoint(inst)
        conn = await self._connect(vm, host, port, key)
        try:
            probe = "for p in make python3 timeout tar; do command -v $p >/dev/null || " \
                    "{ echo no $p; exit 3; }; done"
            if self.isolate_network:
                probe += ("; unshare --net true || { echo 'cannot make a network namespace "
                          "(unshare --net), so jobs cannot be cut off the network'; exit 3; }")
            result = await conn.run(self._root(probe), check=False)
            if result.exit_status != 0:
                detail = (str(result.stdout or "") + str(result.stderr or "")).strip()
                raise VMNotReadyError(f"instance {iid} cannot run jobs: "
                                      f"{detail or f'exit {result.exit_status}'}")
            if self.disable_metadata and not vm.driver_data.get("keep_metadata"):
                await self._metadata_off(client, iid)
        except BaseException as e:
            conn.close()  # (cancelled too: never left open, never stored)
            if isinstance(e, OSError | asyncssh.Error):
                raise VMNotReadyError(f"instance {iid}: probe failed: {e}") from e
            raise
        self._hang_up(iid)
        self._conns[iid] = conn

    async def _metadata_off(self, client: Any, iid: str) -> None:
        """Turn the instance's metadata endpoint off and wait until EC2 says
        it is (the user data holds the host key, the endpoint a role's
        credentials: a job must read neither). A VM where it cannot be
        turned off runs no job."""
        try:
            answer = await client.modify_instance_metadata_options(InstanceId=iid,
                                                                   HttpEndpoint="disabled")
            options = answer.get("InstanceMetadataOptions") or {}
            while options.get("State") != "applied" or options.get("HttpEndpoint") != "disabled":
                await anyio.sleep(self.poll_interval)
                inst = await self._describe(client, iid)
                options = (inst or {}).get("MetadataOptions") or {}
        except Exception as e:
            raise VMNotReadyError(f"instance {iid}: its metadata endpoint could not be "
                                  f"turned off: {self._explain(e, 'metadata options')}") from e

    # ----------------------------------------------------------- jobs

    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        # Nothing reaches the instance here: the tar rides on runJob's channel.
        drop_spooled(vm, "input_tar")
        try:
            vm.driver_data["input_tar"] = await anyio.to_thread.run_sync(
                self.spool.input_tar, list(inputFiles), JOB_DIR,
                (AUTODRIVER_IN_VM, self._autodriver))
        except OSError as e:
            raise CopyInError(f"reading input files: {e}", status=e.errno or -1) from e

    async def runJob(self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int,
                     disableNetwork: bool) -> int:
        self.discard_feedback(vm)
        iid = vm.driver_data.get("iid", "")
        conn = self._conns.get(iid)
        if conn is None or conn.is_closed():
            raise RunJobError(f"instance {iid}: no SSH connection"
                              + self._interruption(iid))
        tar = vm.driver_data.pop("input_tar", None)
        if tar is None:
            tar = await anyio.to_thread.run_sync(
                self.spool.input_tar, [], JOB_DIR, (AUTODRIVER_IN_VM, self._autodriver))
        try:
            return await self._run_job(vm, conn, Path(tar), runTimeout, maxOutputFileSize,
                                       disableNetwork and self.isolate_network)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tar)

    async def _why_lost(self, vm: TangoMachine) -> str:
        """Why an instance's connection went: " (spot instance ... was
        interrupted ...)" if EC2 stopped or terminated it, else ""."""
        iid = vm.driver_data.get("iid", "")
        rec = self._instances.get(iid)
        if rec is not None and rec.interrupted is None and self._client is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10), \
                    contextlib.suppress(Exception):
                inst = await self._describe(self._client, iid)
                self.check_states({iid: inst} if inst else {}, {iid: rec})
        return self._interruption(iid)

    def _interruption(self, iid: str) -> str:
        rec = self._instances.get(iid)
        return f" ({rec.interrupted})" if rec is not None and rec.interrupted else ""

    async def _run_job(self, vm: TangoMachine, conn: asyncssh.SSHClientConnection, tar: Path,
                       runTimeout: float, maxOutputFileSize: int, no_network: bool) -> int:
        iid = vm.driver_data["iid"]
        run = ["python3", "-S", "-E", f"/{AUTODRIVER_IN_VM}", *arguments(
            timeout=runTimeout, max_output=maxOutputFileSize, nproc=self.nproc,
            fsize=self.fsize, cpu_seconds=self.cpu_seconds, user=self.grading_user,
            partial=PARTIAL_IN_VM, env=self.env, seccomp=self.seccomp, job_dir=f"/{JOB_DIR}",
        )]
        # The remote hard deadline: the autodriver stops the job at its own
        # timeout; if it is stuck, `timeout` kills it a little later, before
        # the caller's deadline (runjob_grace) cancels the channel.
        hard = runTimeout + self.hard_deadline_grace if runTimeout else 0
        home = f"/{JOB_DIR.rsplit('/', 1)[0]}"
        script = (
            "{ echo -1000 > /proc/self/oom_score_adj; } 2>/dev/null; "
            f'find "{home}" -mindepth 1 -delete 2>/dev/null; mkdir -p "/{JOB_DIR}" && '
            f"tar -x -m -o -f - -C / || exit {UNPACK_FAILED}; "
            # not exec'd: `timeout -s KILL` kills its own process group, itself
            # included, and this shell then exits 137 (an exit status, not a
            # signal the channel would report as a lost connection)
            + (f"timeout -s KILL {format_seconds(hard)} " if hard else "")
            # the job's own network namespace: a loopback, nothing else (not
            # the VPC, not the metadata address)
            + ("unshare --net -- " if no_network else "")
            + " ".join(shlex.quote(a) for a in run) + "; s=$?; exit $s"
        )
        cap = min(maxOutputFileSize + 64 * KIB if maxOutputFileSize else self.feedback_cap,
                  self.feedback_cap)
        feedback = await anyio.to_thread.run_sync(
            self.spool.feedback, f"feedback-{uuid.uuid4().hex}", cap)
        err = bytearray()
        process: asyncssh.SSHClientProcess[bytes] | None = None
        try:
            process = await conn.create_process(self._root(script), encoding=None)
            stdin = process.stdin

            async def write(chunk: bytes) -> None:
                stdin.write(chunk)
                await stdin.drain()

            async def send() -> None:
                try:
                    await send_file(write, tar)
                    stdin.write_eof()
                except (BrokenPipeError, ConnectionError, asyncssh.Error):
                    # the remote side stopped reading (tar failed, exit 90)
                    # or the connection went: the exit status says which
                    return

            async def read_err() -> None:
                while chunk := await process.stderr.read(64 * KIB):
                    if len(err) < 64 * KIB:
                        err.extend(chunk[: 64 * KIB - len(err)])

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_err)
                tg.start_soon(send)
                while chunk := await process.stdout.read(256 * KIB):
                    try:
                        await feedback.write(chunk)
                    except OSError as e:
                        raise _SpoolFailed(e) from e
            await process.wait_closed()
            code = process.exit_status
            try:
                await feedback.finish()
            except OSError as e:
                raise _SpoolFailed(e) from e
        except BaseException as e:
            feedback.discard()
            if process is not None:
                process.close()
            spool = _find(e, _SpoolFailed)
            if spool is not None:
                raise RunJobError(f"spooling the job's feedback on this host: "
                                  f"{spool.__cause__}") from None
            if _find(e, (OSError, asyncssh.Error)) is not None:
                why = await self._why_lost(vm)
                raise RunJobError(f"instance {iid}: SSH connection lost during the job"
                                  f"{why}: {_find(e, (OSError, asyncssh.Error))}") from None
            raise
        killed = process.exit_signal is not None and process.exit_signal[0] == "KILL"
        if hard and killed:
            code = KILLED  # (a shell that was exec'd away after all)
        elif code is None or process.exit_signal is not None:
            feedback.discard()
            why = process.exit_signal[0] if process.exit_signal else "no exit status"
            raise RunJobError(f"instance {iid}: the job's channel ended without an exit code "
                              f"({why}): the connection was lost{await self._why_lost(vm)}")
        if code == KILLED and hard and not feedback.size:
            text = (f"Autodriver: Job timed out after {format_seconds(runTimeout)} seconds\n"
                    "Autodriver: the autodriver did not stop it and was killed at the VM's "
                    f"hard deadline ({format_seconds(hard)} s)\n").encode()
            await anyio.to_thread.run_sync(feedback.path.write_bytes, text)
            vm.feedback = Feedback(path=feedback.path, spooled=True)
            return EXIT_TIMEOUT
        if code == UNPACK_FAILED or code >= 126 or not feedback.size:
            feedback.discard()
            detail = err.decode(errors="replace").strip()[:500]
            raise RunJobError(f"instance {iid}: the autodriver did not run (exit {code}): "
                              f"{detail or 'no output'}")
        vm.feedback = Feedback(path=feedback.path, spooled=True)
        return code

    async def partialOutput(self, vm: TangoMachine) -> bytes | None:
        conn = self._conns.get(vm.driver_data.get("iid", ""))
        if conn is None or conn.is_closed():
            return None
        try:
            with anyio.fail_after(10):
                result = await conn.run(self._root(f"cat {PARTIAL_IN_VM}"), encoding=None,
                                        check=False)
        except (OSError, asyncssh.Error, TimeoutError):
            return None
        out = result.stdout
        return bytes(out[: 64 * KIB]) if result.exit_status == 0 and isinstance(
            out, bytes) else None

    # ----------------------------------------------------------- destroying

    async def destroyVM(self, vm: TangoMachine) -> None:
        drop_spooled(vm, "input_tar")
        self.discard_feedback(vm)
        iid = vm.driver_data.get("iid") or vm.instance_id
        if not iid:
            return  # never launched
        self._hang_up(iid)
        rec = self._instances.get(iid)
        if rec is not None:
            rec.vm = None  # its end is ours, not an interruption (see _watch)
        client = vm.driver_data.get("client") or await self._ec2()
        try:
            await client.terminate_instances(InstanceIds=[iid])
        except ClientError as e:
            if not _code(e).startswith("InvalidInstanceID"):
                raise DestroyVMError(self._explain(e, f"terminating {iid}")) from e
        except BotoCoreError as e:
            raise DestroyVMError(self._explain(e, f"terminating {iid}")) from e
        was_full = len(self._instances) + self._launching >= self.max_instances
        self._gone(iid)
        if was_full:
            self.report_room()

    async def safeDestroyVM(self, vm: TangoMachine) -> None:
        await self.destroyVM(vm)
        iid = vm.driver_data.get("iid") or vm.instance_id
        if not iid:
            return
        client = vm.driver_data.get("client") or await self._ec2()
        try:
            with anyio.fail_after(self.terminate_timeout):
                while True:
                    inst = await self._describe(client, iid)
                    if inst is None or inst.get("State", {}).get("Name") == "terminated":
                        return
                    await anyio.sleep(self.poll_interval)
        except TimeoutError:
            raise DestroyVMError(f"instance {iid} not terminated after "
                                 f"{self.terminate_timeout:g} s") from None
        except (ClientError, BotoCoreError) as e:
            raise DestroyVMError(self._explain(e, f"describing {iid}")) from e

    async def _list(self, client: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        paginator = client.get_paginator("describe_instances")
        async for page in paginator.paginate(Filters=[
                *filters, {"Name": "instance-state-name", "Values": LIVE_STATES}]):
            for r in page.get("Reservations", []):
                found.extend(r.get("Instances", []))
        return found

    def _vm_of(self, inst: Mapping[str, Any]) -> TangoMachine:
        vm_tag = _tag(inst, TAG_VM) or ""
        vm = TangoMachine(
            name=_tag(inst, TAG_POOL) or "unknown", image=_tag(inst, TAG_IMAGE) or None,
            vmms=self.driver_name, id=int(vm_tag) if vm_tag.isdigit() else None,
            instance_id=str(inst["InstanceId"]), ec2_id=str(inst["InstanceId"]),
            domain_name=inst.get("PublicIpAddress") or inst.get("PrivateIpAddress"),
        )
        vm.driver_data.update(iid=inst["InstanceId"], owner=_tag(inst, TAG_OWNER),
                              role=_tag(inst, TAG_ROLE))
        return vm

    async def getVMs(self) -> list[TangoMachine]:
        client = await self._ec2()
        try:
            found = await self._list(client, [{"Name": f"tag:{TAG_OWNER}",
                                               "Values": [self.owner]}])
        except (ClientError, BotoCoreError) as e:
            raise InitializeVMError(self._explain(e, "listing instances")) from e
        return [self._vm_of(i) for i in found]

    async def getOrphans(self) -> list[TangoMachine]:
        """Tagged instances (any owner's) whose maker is provably gone: its
        process on this host and boot is dead, or it was a driver of this
        process that is closed. An instance made elsewhere is left alone."""
        client = await self._ec2()
        try:
            found = await self._list(client, [{"Name": "tag-key", "Values": [TAG_OWNER]}])
        except (ClientError, BotoCoreError) as e:
            raise InitializeVMError(self._explain(e, "listing instances")) from e
        return [self._vm_of(i) for i in found
                if i["InstanceId"] not in self._instances
                and liveness.mark_is_dead(_tag(i, TAG_PROCESS))]

    # ----------------------------------------------------------- background

    async def background(self) -> None:
        """Keep the stopped warm stock, and watch for interrupted instances."""
        async with anyio.create_task_group() as tg:
            for pool, n in self.stopped_warm.items():
                if n > 0:
                    tg.start_soon(self._keep_stock, pool, n)
            tg.start_soon(self._watch)

    async def _keep_stock(self, pool: str, n: int) -> None:
        """Keep ``n`` stopped instances of ``pool`` ready to start."""
        image = next((img for img in self.images if pool_name(img) == pool), pool)
        stock = self._stock.setdefault(pool, {})
        failures = 0
        while True:
            event = self._stock_events[pool] = anyio.Event()
            missing = n - len(stock) - self._stocking.get(pool, 0)
            room = self.max_instances - len(self._instances) - self._launching
            if missing > 0 and room > 0:
                k = min(missing, room)
                # the room is taken now, before any await: no initializeVM
                # can pass the cap meanwhile
                self._stocking[pool] = self._stocking.get(pool, 0) + k
                self._launching += k
                results: list[bool] = []
                try:
                    async with anyio.create_task_group() as tg:
                        for _ in range(k):
                            tg.start_soon(self._stock_one, pool, image, results)
                finally:
                    self._stocking[pool] -= k
                failures = 0 if results and all(results) else failures + 1
                if failures:
                    await anyio.sleep(min(60.0, self.poll_interval * 2 ** failures))
                continue
            await event.wait()  # an instance taken, or room freed

    async def _stock_one(self, pool: str, image: str, results: list[bool]) -> None:
        """Make one stopped warm instance (its room was reserved in
        ``_launching`` by the caller; given back here)."""
        vm = TangoMachine(name=pool, image=image, vmms=self.driver_name, id=0)
        vm.driver_data["keep_metadata"] = True  # (its next boot reads the user data)
        iid = ""
        reserved = True
        client: Any = None
        try:
            client = await self._ec2()
            try:
                iid, public, _ = await self._launch(client, vm, "stopped-warm")
            finally:
                self._launching -= 1
                reserved = False
            self._adopt(vm, iid, public, False, role="stopped-warm")
            # booted once: its key installed, SSH shown to work
            with anyio.fail_after(600):
                await self.waitVM(vm, 600)
            self._hang_up(iid)
            self._instances[iid].vm = None  # (its stopping is no interruption)
            await client.stop_instances(InstanceIds=[iid])
            with anyio.fail_after(600):
                await self._wait_state(client, iid, "stopped")
        except BaseException as e:
            # failed, or cancelled (the manager closing): nothing half-made stays
            results.append(False)
            if reserved:
                self._launching -= 1
            if iid and client is not None:
                await self._terminate(client, [iid], "a stopped warm instance not made")
            if not isinstance(e, Exception):
                raise
            log.warning("ec2: making a stopped warm instance of pool %s failed: %s", pool, e)
            return
        self._record(iid, pool, "stopped")
        itype = self.instance_type_for(vm)
        self._stock.setdefault(pool, {})[iid] = (public, itype)
        results.append(True)
        log.info("ec2: stopped warm instance %s of pool %s ready", iid, pool)

    async def _watch(self) -> None:
        """Every ``monitor_interval``: an instance of ours that EC2 stopped
        or terminated behind our back (a spot interruption) is lost."""
        while True:
            await anyio.sleep(self.monitor_interval)
            now = time.monotonic()
            # (a VM adopted in the last moments may not be in EC2's
            # eventually consistent listing yet, or still show "stopped")
            busy = {iid: rec for iid, rec in self._instances.items()
                    if rec.state == "running" and rec.vm is not None
                    and now - rec.adopted > WATCH_GRACE}
            if not busy or self._client is None:
                continue
            try:
                found = await self._list(self._client, [{"Name": f"tag:{TAG_OWNER}",
                                                         "Values": [self.owner]}])
                self.check_states({i["InstanceId"]: i for i in found}, busy)
            except Exception as e:  # (botocore's bare parser errors too): next turn
                log.warning("ec2: watching instances: %s", e)

    def check_states(self, found: Mapping[str, Mapping[str, Any]],
                     mine: Mapping[str, _Instance]) -> list[TangoMachine]:
        """Mark the instances of ``mine`` that ``found`` (a listing) shows
        stopping, stopped or gone as lost: their SSH connection is closed (a
        job on one fails as a system error, retried elsewhere) and the pools
        are told. Returns them."""
        lost: list[TangoMachine] = []
        for iid, rec in mine.items():
            inst = found.get(iid)
            state = (inst or {}).get("State", {}).get("Name", "terminated")
            if state in ("pending", "running") or rec.vm is None:
                continue
            reason = (inst or {}).get("StateReason", {}).get("Message") or state
            rec.interrupted = (f"{'spot ' if rec.spot else ''}instance {iid} was "
                               f"{'interrupted' if rec.spot else state} by EC2: {reason}")
            self.counters["interrupted"] += 1
            log.warning("ec2: %s", rec.interrupted)
            self._hang_up(iid)
            lost.append(rec.vm)
            rec.vm = None
        if lost:
            self.report_lost(lost)
        return lost

    # ----------------------------------------------------------- job-owned

    @contextlib.asynccontextmanager
    async def job_vm(self, spec: TangoMachine, access_key_id: str, access_key: str,
                     ready_timeout: float) -> AsyncIterator[TangoMachine]:
        """An instance made with a job's own credentials (Tango's
        ``accessKeyId``/``accessKey``): a client of its own (closed after),
        never pooled, terminated when the block ends, whatever happened.
        Job-owned instances of this owner that a dead process left in that
        account are terminated first."""
        async with contextlib.AsyncExitStack() as stack:
            client = await self._open_client(stack, (access_key_id, access_key))
            vm = dataclasses.replace(spec, driver_data={}, feedback=None)
            vm.driver_data["client"] = client
            await self._clean_job_owned(client)
            try:
                iid, public, _ = await self._launch(client, vm, "job")
            except InitializeVMError as e:
                raise InitializeVMError(f"job-owned instance: {e}") from e
            vm.instance_id = vm.ec2_id = iid
            vm.driver_data.update(iid=iid, host_key=public, spot=False)
            try:
                try:
                    with anyio.fail_after(ready_timeout):
                        await self.waitVM(vm, ready_timeout)
                except TimeoutError:
                    raise VMNotReadyError(f"job-owned instance {iid} not ready after "
                                          f"{ready_timeout:g} s") from None
                yield vm
            finally:
                self._hang_up(iid)
                if not await self._terminate(client, [iid], "its job-owned job ended"):
                    log.error("ec2: job-owned instance %s of job VM %s is still running in "
                              "the job's account", iid, vm.id)
                vm.driver_data.pop("client", None)  # (it holds the job's secret)
                drop_spooled(vm, "input_tar")
                self.discard_feedback(vm)

    async def _clean_job_owned(self, client: Any) -> None:
        try:
            found = await self._list(client, [
                {"Name": f"tag:{TAG_OWNER}", "Values": [self.owner]},
                {"Name": f"tag:{TAG_ROLE}", "Values": ["job"]}])
            dead = [str(i["InstanceId"]) for i in found
                    if liveness.mark_is_dead(_tag(i, TAG_PROCESS))]
            if dead:
                log.info("ec2: terminating %d job-owned instances left by a dead process",
                         len(dead))
                await client.terminate_instances(InstanceIds=dead)
        except (ClientError, BotoCoreError) as e:
            raise InitializeVMError(self._explain(e, "listing job-owned instances")) from e


class _SpoolFailed(Exception):
    """Writing the feedback to this host's spool file failed (not the VM's doing)."""


def _find(e: BaseException,
          kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """``e`` or the first exception of ``kind`` inside it (an exception group)."""
    if isinstance(e, kind):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _find(sub, kind)
            if found is not None:
                return found
    return None
