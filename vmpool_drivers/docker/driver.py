"""The Docker driver: warm containers through aiodocker.

A VM is a started container (``tail -f /dev/null`` under the engine's init)
with vmpool's labels, resource limits, no network (unless the pool's spec
asks for host networking), all capabilities dropped but the few the
autodriver needs, and ``no-new-privileges``.

The engine does about 30 operations a second on two cores whatever the
concurrency, so a job costs it as few round trips as possible: copyIn only
writes a tar (the job's files and vmpool's autodriver) to a spool file,
runJob is ONE exec that unpacks that tar from its stdin (sent a chunk at a
time) and runs the autodriver, whose feedback comes back on its stdout and
is written to a spool file as it arrives, until copyOut moves it to the
host: neither the input nor a 64 MiB feedback is ever held in memory. The
spool files live in a private (0700) directory of the driver's, under
``spool_dir`` (default: the system's temporary directory), removed at
close, or by a later driver if this one's process died. The exec's exit
code is the autodriver's (Tango loses it).

Every container is labelled with its owner and with the identity of the
process that made it (``vmpool.process``: host, boot id, pid namespace,
pid, start time, and a nonce per driver): :meth:`DockerVMMS.getOrphans`
returns the containers whose maker is provably gone (see
:mod:`vmpool_drivers.liveness`), whoever owned them.

An exec'd process cannot be killed through the engine, so a job's deadline
is enforced twice: by the autodriver inside, and by cancellation outside —
when runJob is cancelled the container is killed at once (and the pool
destroys the VM).

The sandbox (README, "Security model"; the shared parts are in
:mod:`vmpool_drivers.policy`):

- environment: the job gets only the autodriver's short list plus what the
  image declares (its ``Env``, read once per image) and the pool's ``env``
  option, as ``--env`` options; the exec itself gets an explicit ``Env``.
- capabilities: ``CapDrop ALL`` + :data:`~vmpool_drivers.policy.AUTODRIVER_CAPS`
  (never DAC_READ_SEARCH), ``no-new-privileges``, the engine's default
  seccomp profile (``seccomp_profile`` replaces it, e.g. "unconfined" in
  the tests that show the autodriver's own filter holds).
- a host uid of its own per container: claimed host-wide in the
  :class:`~vmpool_drivers.policy.UidRegistry` when the container is made, given to
  the grading user inside it (its passwd and group entries are rewritten by
  the first job's exec), released once the container is gone. Per-uid
  limits (RLIMIT_NPROC, the autodriver's "every process of the grading
  uid" kill) are then the container's own. The engine's userns-remap is no
  substitute: it maps every container to the same host range, so all
  grading users would still be one host uid.
- files: the grading user's home (the job directory), /tmp, /var/tmp and
  /dev/shm are size- and inode-limited tmpfs mounts
  (:func:`~vmpool_drivers.policy.file_quotas`: together at most half the VM's
  memory), and nothing else on the container's root file system is
  writable by the grading user (world-writable paths of the image are found
  once per image, in a container of their own, and made not so in each
  container by its first job).
- memory: the container's processes run with ``OomScoreAdj -1000`` (the
  autodriver gives the job's processes +1000) where the engine can set it;
  SysV shared memory dies with the job's processes (``shm_rmid_forced``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shlex
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import aiodocker
import anyio
import anyio.to_thread
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from autodriver import COMPILE_PY, arguments, env_arguments
from autodriver import SOURCE as AUTODRIVER
from vmpool.config import KIB, MIB
from vmpool.errors import (
    CopyInError,
    DestroyVMError,
    InitializeVMError,
    RunJobError,
    VMNotReadyError,
)
from vmpool.models import InputFile, TangoMachine
from vmpool.vmms import VMMS, Feedback, safe_name
from vmpool_drivers import liveness
from vmpool_drivers.jobfiles import (
    Spool,
    SpoolDir,
    add_memory_line_to,
    drop_spooled,
    send_file,
)
from vmpool_drivers.policy import (
    AUTODRIVER_CAPS,
    DEFAULT_DISK_QUOTA,
    DEFAULT_INODE_QUOTA,
    DEFAULT_PATH,
    SANDBOX_ENV,
    UID_DIR,
    UidRegistry,
    file_quotas,
    pids_of_uid,
)

log = logging.getLogger(__name__)

JOB_DIR = "home/autograde/autolab"
HOME_DIR = "/home/autograde"
AUTODRIVER_IN_IMAGE = "opt/vmpool/autodriver.py"
AUTODRIVER_PYC_IN_IMAGE = "opt/vmpool/autodriver.pyc"
#: the autodriver's snapshot of a running job's output (root-only directory)
PARTIAL_IN_IMAGE = "/opt/vmpool/partial"
# What the autodriver needs as root in the container, and nothing else; an
# engine that cannot grant SYS_RESOURCE (nor a negative OomScoreAdj: the same
# capability) gets the rest (see DockerVMMS._create).
CAPS = list(AUTODRIVER_CAPS)
CAPS_UNPROTECTED = [c for c in CAPS if c != "SYS_RESOURCE"]
# Names of the image's Env not passed on to the job: the autodriver sets them
# (PATH comes from the exec's own environment, which is the image's PATH).
NOT_PASSED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "PWD", "HOSTNAME", "SHLVL"})
# Created by the first job's exec once the grading user has its uid.
SETUP_MARK = "/etc/.vmpool-setup"
# Exit codes of the exec's own shell (not the autodriver's 0-3).
UNPACK_FAILED = 90
# The container's OOM kill counter (cgroup v1, then v2), read by the exec's
# shell into $n with builtins only (no extra process): the autodriver cannot
# see OOM kills of the container's cgroup, and may be their victim itself.
OOM_COUNT = (
    "n=-; for f in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; "
    'do if [ -r "$f" ]; then while read -r k v; do if [ "$k" = oom_kill ]; then n=$v; fi; '
    'done < "$f"; break; fi; done'
)
OOM_MARK = "vmpool-oom-kills"

LABEL_OWNER = "vmpool.owner"
LABEL_POOL = "vmpool.pool"
LABEL_VM = "vmpool.vm"
LABEL_IMAGE = "vmpool.image"
LABEL_UID = "vmpool.uid"
#: the process (and driver) that made the container, alive or not: see
#: vmpool_drivers.liveness.process_mark
LABEL_PROCESS = "vmpool.process"
#: the host the container's engine is on, for a driver over many engines
#: (vmpool_drivers.ssh_docker): one host's reconciliation never touches
#: another's containers, even on a shared engine
LABEL_HOST = "vmpool.host"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DockerVMMS(VMMS):
    driver_name: ClassVar[str] = "docker"

    def __init__(
        self,
        *,
        owner: str | None = None,
        prefix: str = "local",
        url: str | None = None,
        images: Sequence[str] | None = None,
        image_autodriver: str | None = None,
        memory_mb: int = 1024,
        pids_limit: int = 512,
        nproc: int = 100,
        fsize: int = 100 * MIB,
        cpu_seconds: int = 0,
        grading_user: str = "autograde",
        feedback_cap: int = 64 * MIB,
        spool_dir: str | None = None,
        env: Mapping[str, str] | None = None,
        seccomp_profile: str | None = None,
        seccomp: bool = True,
        disk_quota: int = DEFAULT_DISK_QUOTA,
        inode_quota: int = DEFAULT_INODE_QUOTA,
        uid_base: int = 61000,
        uid_count: int = 2000,
        uid_dir: str = UID_DIR,
        host: str | None = None,
        vmms_name: str | None = None,
    ) -> None:
        super().__init__(owner=owner, prefix=prefix)
        #: the name of the host this engine is on, when this driver is one of
        #: several engines of one pool: it labels and names the containers,
        #: and getVMs/getOrphans see this host's containers only
        self.host = host
        #: the VMMS name listed VMs carry (the composite driver's)
        self.vmms_name = vmms_name or self.driver_name
        #: the job's own variables (the pool's config), on top of the image's Env
        self.env = dict(env or {})
        env_arguments(self.env)  # checked now: a bad name fails at start, not per job
        for name in self.env:
            if not _NAME.fullmatch(name):
                raise ValueError(f"bad environment variable name {name!r}")
        #: None: the engine's default seccomp profile (the normal case); else
        #: the SecurityOpt value ("unconfined", or a profile's JSON)
        self.seccomp_profile = seccomp_profile
        #: the autodriver's own filter in the job's process (see the autodriver)
        self.seccomp = seccomp
        if disk_quota <= 0 or inode_quota <= 0:
            raise ValueError(f"disk_quota and inode_quota must be positive, got {disk_quota}, "
                             f"{inode_quota}")
        self.disk_quota = disk_quota
        self.inode_quota = inode_quota
        if uid_base < 1000 or uid_count < 1:
            raise ValueError(f"need uid_base >= 1000 and uid_count >= 1, got {uid_base}, "
                             f"{uid_count}")
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.uid_dir = uid_dir
        # made on first use (it needs root and the host's /run): a driver that
        # only lists images needs neither
        self._uids: UidRegistry | None = None
        #: holder -> uid of the claims this process made and has not released
        #: (a stale-claim sweep never touches them: their container may be
        #: on its way)
        self._held: dict[str, int] = {}
        #: whether the engine can set OomScoreAdj -1000 and grant SYS_RESOURCE
        #: (None: not known yet; found at the first container)
        self._oom_protect: bool | None = None
        self._image_env: dict[str, dict[str, str]] = {}
        #: world-writable paths of each image's root file system (made not so
        #: in every container of it)
        self._writable: dict[str, list[str]] = {}
        self._scan_locks: dict[str, anyio.Lock] = {}
        self.url = url or os.environ.get("DOCKER_HOST")
        self.images = list(images) if images is not None else None
        #: run the image's own autodriver (e.g. Tango's /usr/bin/autodriver)
        #: instead of injecting vmpool's
        self.image_autodriver = image_autodriver
        self.memory_mb = memory_mb
        self.pids_limit = pids_limit
        self.nproc = nproc
        self.fsize = fsize
        self.cpu_seconds = cpu_seconds
        if not re.fullmatch(r"[a-z_][a-z0-9_-]*", grading_user):
            raise ValueError(f"bad grading user name {grading_user!r}")
        self.grading_user = grading_user
        self.feedback_cap = feedback_cap
        self._docker: aiodocker.Docker | None = None
        self._autodriver = AUTODRIVER.read_bytes()
        self._owner_tag = hashlib.sha1(self.owner.encode()).hexdigest()[:8]
        self._verified_images: set[str] = set()
        #: the autodriver compiled by each image's Python (unchecked-hash .pyc)
        self._compiled: dict[str, bytes] = {}
        # Alive until close: containers marked with this driver's nonce are
        # not orphans (see vmpool_drivers.liveness), whoever asks.
        self._nonce = uuid.uuid4().hex[:12]
        liveness.register(self._nonce)
        self._mark = liveness.process_mark(self._nonce)
        #: where input tars and feedback wait between copyIn, runJob and
        #: copyOut (a private directory in it, made on first use)
        self.spool = SpoolDir(spool_dir, "vmpool-docker-")

    # ----------------------------------------------------------- helpers

    @property
    def docker(self) -> aiodocker.Docker:
        # Made on first use, inside the event loop (aiohttp needs one).
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.url)
        return self._docker

    async def close(self) -> None:
        liveness.unregister(self._nonce)
        if self.spool.made:
            await anyio.to_thread.run_sync(self.spool.remove)
        if self._docker is not None:
            docker, self._docker = self._docker, None
            await docker.close()

    def container_name(self, vm: TangoMachine) -> str:
        # Tango's instance name, made unique per manager (and host) on a
        # shared engine.
        host = f"-{self.host}" if self.host else ""
        return safe_name(f"{self.instanceName(vm.id, vm.name)}{host}-{self._owner_tag}")

    def _container(self, vm: TangoMachine) -> DockerContainer:
        ref = vm.driver_data.get("cid") or self.container_name(vm)
        return self.docker.containers.container(ref)

    async def getImages(self) -> list[str]:
        tags: list[str] = []
        for img in await self.docker.images.list():
            tags.extend(t for t in img.get("RepoTags") or [] if t != "<none>:<none>")
        found = sorted(set(tags) | {t.removesuffix(":latest") for t in tags})
        if self.images is not None:
            return [t for t in self.images if t in found]
        return found

    # ----------------------------------------------------------- uids

    def _registry(self) -> UidRegistry:
        if self._uids is None:
            self._uids = UidRegistry(self.uid_base, self.uid_count, self.uid_dir)
        return self._uids

    def _holder(self, vm: TangoMachine) -> str:
        # (an orphan's owner is another's)
        owner = vm.driver_data.get("owner") or self.owner
        return f"docker:{owner}/{vm.driver_data.get('cname') or self.container_name(vm)}"

    def _claim_uid(self, holder: str) -> int:
        registry = self._registry()
        try:
            uid = registry.claim(holder)
        except LookupError:
            # all in use: claims of containers of ours that are gone may be
            # among them (a crash, a removal we did not see end)
            self._release_stale_claims(None)
            uid = registry.claim(holder)
        self._held[holder] = uid
        return uid

    async def _release_uid(self, vm: TangoMachine) -> None:
        """Release the VM's uid: only call once its container is gone."""
        uid = vm.driver_data.get("uid")
        holder = self._holder(vm)
        self._held.pop(holder, None)
        if isinstance(uid, int):
            await anyio.to_thread.run_sync(self._release_claim, uid, holder)

    def _release_claim(self, uid: int, holder: str) -> None:
        if self._uids is None and not os.path.isdir(self.uid_dir):
            return  # nothing was ever claimed on this host
        registry = self._registry()
        if not registry.holds(uid, holder):
            return
        # The engine removed the container and every process in it; a
        # process of the uid still alive (only if the engine is not on this
        # host, or lied) keeps the claim, for the stale-claim sweep.
        if pids_of_uid(uid):
            log.warning("uid %d of %s still has processes; not released", uid, holder)
            return
        registry.release(uid, holder)

    def _release_stale_claims(self, names: set[str] | None) -> list[int]:
        """Release this owner's claims whose container is not in ``names`` (the
        containers that exist; None: ask no one, release only claims of
        containers this process removed) and whose uid has no process left.
        Claims this process holds for a container on its way are kept."""
        if self._uids is None and not os.path.isdir(self.uid_dir):
            return []
        registry = self._registry()
        prefix = f"docker:{self.owner}/"
        released = []
        for uid, holder in list(registry.claims(prefix)):
            if holder in self._held or names is None:
                continue
            if holder[len(prefix):] in names or pids_of_uid(uid):
                continue
            registry.release(uid, holder)
            released.append(uid)
        return released

    # ----------------------------------------------------------- containers

    async def _env_of_image(self, image: str) -> dict[str, str]:
        """The image's declared Env (one inspect per image)."""
        env = self._image_env.get(image)
        if env is None:
            try:
                info = await self.docker.images.inspect(image)
            except DockerError as e:
                if e.status == 404:
                    raise InitializeVMError(f"image {image!r} not found: {e.message}") from e
                raise InitializeVMError(f"inspecting image {image!r}: {e.message}") from e
            env = {}
            for item in (info.get("Config") or {}).get("Env") or []:
                name, sep, value = str(item).partition("=")
                if sep and _NAME.fullmatch(name) and "\x00" not in value:
                    env[name] = value
            self._image_env[image] = env
        return env

    def _host_config(self, vm: TangoMachine, uid: int, protect: bool) -> dict[str, Any]:
        memory = self.memory_bytes(vm)
        network = "host" if vm.network == "host" else "none"
        quotas = file_quotas(memory, self.disk_quota, self.inode_quota)

        def tmpfs(role: str, extra: str) -> str:
            size, inodes = quotas[role]
            return f"size={size},nr_inodes={inodes},{extra}"

        host_config: dict[str, Any] = {
            "Init": True,
            "Memory": memory,
            "MemorySwap": memory,
            "PidsLimit": self.pids_limit,
            "NetworkMode": network,
            "CapDrop": ["ALL"],
            "CapAdd": CAPS if protect else CAPS_UNPROTECTED,
            "SecurityOpt": ["no-new-privileges"]
            + ([f"seccomp={self.seccomp_profile}"] if self.seccomp_profile else []),
            "Ulimits": [
                {"Name": "core", "Soft": 0, "Hard": 0},
                {"Name": "nofile", "Soft": 4096, "Hard": 4096},
            ],
            # The job's files: in memory, limited (bytes and inodes), gone with
            # the container; the home's root belongs to the grading uid.
            # (Docker's defaults add nosuid,nodev, and noexec unless "exec".)
            "Tmpfs": {
                HOME_DIR: tmpfs("home", f"mode=0755,uid={uid},gid={uid},exec"),
                "/tmp": tmpfs("tmp", "mode=1777,exec"),
                "/var/tmp": tmpfs("var_tmp", "mode=1777,exec"),
                "/dev/shm": tmpfs("shm", "mode=1777"),
            },
            "ShmSize": quotas["shm"][0],
            # SysV segments die with the job's processes: nothing the job
            # leaves in memory outlives it but its (limited) files
            "Sysctls": {"kernel.shm_rmid_forced": "1"},
        }
        if protect:
            # init, tail and every exec'd process (the autodriver and its
            # shell) are never the OOM killer's victims; the autodriver
            # raises the job's processes to +1000
            host_config["OomScoreAdj"] = -1000
        if vm.cores:
            host_config["NanoCpus"] = int(vm.cores * 1e9)
        return host_config

    # ----------------------------------------------------------- VMMS

    async def initializeVM(self, vm: TangoMachine) -> None:
        if not vm.image:
            raise InitializeVMError("the VM names no image")
        liveness.register(self._nonce)  # (again, for a driver used after close)
        await self._env_of_image(vm.image)
        name = self.container_name(vm)
        vm.driver_data["cname"] = name
        holder = self._holder(vm)
        try:
            uid = self._claim_uid(holder)
        except (OSError, ValueError, LookupError) as e:
            raise InitializeVMError(f"no grading uid for {name}: {e}") from e
        vm.driver_data["uid"] = uid
        network = "host" if vm.network == "host" else "none"
        attempts = [True, False] if self._oom_protect is None else [self._oom_protect]
        for protect in attempts:
            config: dict[str, Any] = {
                "Image": vm.image,
                "Cmd": ["tail", "-f", "/dev/null"],
                "User": "root",
                "WorkingDir": "/",
                "NetworkDisabled": network == "none",
                "Labels": {
                    LABEL_OWNER: self.owner,
                    LABEL_POOL: vm.name,
                    LABEL_VM: str(vm.id),
                    LABEL_IMAGE: vm.image,
                    LABEL_UID: str(uid),
                    LABEL_PROCESS: self._mark,
                    **self._host_labels(),
                },
                "HostConfig": self._host_config(vm, uid, protect),
            }
            try:
                await self._create(vm, config, name)
            except DockerError as e:
                if e.status == 404:
                    raise InitializeVMError(f"image {vm.image!r} not found: {e.message}") from e
                if protect and len(attempts) > 1 and e.status == 500 and "OCI runtime" in str(
                    e.message
                ):
                    # The engine cannot set a negative OomScoreAdj nor grant
                    # SYS_RESOURCE (it lacks CAP_SYS_RESOURCE itself): go
                    # without. The file quotas still keep the job's files
                    # from filling the memory the autodriver needs.
                    await self._remove_failed(vm)
                    continue
                raise InitializeVMError(f"creating container {name}: {e.message}") from e
            if self._oom_protect is None:
                self._oom_protect = protect
                if not protect:
                    log.warning(
                        "docker: the engine cannot set OomScoreAdj -1000 nor grant "
                        "SYS_RESOURCE (%s); containers run without them", self.url or "default"
                    )
            return

    async def _create(self, vm: TangoMachine, config: dict[str, Any], name: str) -> None:
        # Not cancellable half-way: a create cut off after the engine made
        # the container would leave one nobody knows the id of. Bounded.
        with anyio.CancelScope(shield=True), anyio.fail_after(60):
            container = await self.docker.containers.create(config, name=name)
        vm.instance_id = container.id
        vm.driver_data["cid"] = container.id
        await container.start()

    async def _remove_failed(self, vm: TangoMachine) -> None:
        """Remove a container that did not start (its name is reused)."""
        with (
            anyio.CancelScope(shield=True),
            anyio.fail_after(60),
            contextlib.suppress(DockerError),
        ):
            await self._container(vm).delete(force=True, v=True)
        vm.driver_data.pop("cid", None)
        vm.instance_id = None

    async def waitVM(self, vm: TangoMachine, max_secs: float) -> None:
        if vm.driver_data.get("verified"):
            # Checked when the pool made it; a container that died since
            # fails the job's exec, and the job is retried on a fresh VM.
            return
        if vm.image in self._verified_images:
            # The image was shown able to run jobs (below); for this container
            # the engine's word that it runs is enough. An exec costs the
            # engine as much as a whole job.
            try:
                info = await self._container(vm).show()
            except DockerError as e:
                raise VMNotReadyError(
                    f"container {vm.driver_data.get('cname')}: {e.message}"
                ) from e
            if not (info.get("State") or {}).get("Running"):
                raise VMNotReadyError(f"container {vm.driver_data.get('cname')} is not running")
            vm.driver_data["verified"] = True
            return
        need = "make" if self.image_autodriver else "make python3"
        probe = f"for p in {need}; do command -v $p >/dev/null || {{ echo no $p; exit 3; }}; done"
        if not self.image_autodriver:
            # Compile the autodriver once per image, with the image's own
            # Python: every job then skips ~10 ms of compiling it.
            # (its temporary files in a directory of root's, not in the
            # job's /tmp, where they would take the job's quota)
            t = "/opt/vmpool/compile"
            probe += f'; mkdir -p {t} && TMPDIR={t} python3 -S -E -c "$1" 2>/dev/null; rm -rf {t}'
        try:
            code, out, err = await self._exec(
                vm, ["sh", "-c", probe, "vmpool-probe", COMPILE_PY],
                stdin=None if self.image_autodriver else self._autodriver,
                out_cap=4 * len(self._autodriver) + 64 * KIB,
            )
        except DockerError as e:
            raise VMNotReadyError(f"container {vm.driver_data.get('cname')}: {e.message}") from e
        if code != 0:
            detail = (out + err).decode(errors="replace").strip()
            raise VMNotReadyError(f"image {vm.image} cannot run jobs: {detail or f'exit {code}'}")
        await self._scan_image(vm.image or "")
        vm.driver_data["verified"] = True
        self._verified_images.add(vm.image or "")
        if out[:4] and out[2:4] == b"\r\n" and vm.image:
            self._compiled[vm.image] = out  # a .pyc: 2 magic bytes, then \r\n

    async def _scan_image(self, image: str) -> None:
        """Find what the grading user could write on the image's root file
        system (the container's layer is the host's disk: past every quota).

        Once per image, in a container of its own: walking the whole file
        system charges its dentries and inodes (megabytes for a big image) to
        the memory cgroup of the container that walks it, which must not be
        a job's. Each container's first job then takes the write bit away.
        """
        lock = self._scan_locks.setdefault(image, anyio.Lock())
        async with lock:
            if image in self._writable:
                return
            config: dict[str, Any] = {
                "Image": image,
                "Entrypoint": ["find"],
                "Cmd": ["/", "-xdev", "-perm", "-0002", "!", "-type", "l", "-print"],
                "User": "root",
                "NetworkDisabled": True,
                "Labels": {LABEL_OWNER: self.owner, LABEL_POOL: "vmpool-scan",
                           LABEL_IMAGE: image, LABEL_PROCESS: self._mark,
                           **self._host_labels()},
                "HostConfig": {
                    "NetworkMode": "none", "CapDrop": ["ALL"], "CapAdd": ["DAC_OVERRIDE"],
                    "SecurityOpt": ["no-new-privileges"], "Memory": 256 * MIB,
                    "MemorySwap": 256 * MIB, "PidsLimit": 16, "ReadonlyRootfs": True,
                },
            }
            host = f"-{self.host}" if self.host else ""
            name = safe_name(f"{self.prefix}-scan-{image}{host}-{self._owner_tag}")
            container: DockerContainer | None = None
            try:
                with anyio.CancelScope(shield=True), anyio.fail_after(60):
                    made = await self.docker.containers.create(config, name=name)
                container = made
                await made.start()
                with anyio.fail_after(120):
                    await made.wait()
                lines = await made.log(stdout=True, stderr=False)
            except DockerError as e:
                raise VMNotReadyError(f"scanning image {image}: {e.message}") from e
            finally:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(30),
                    contextlib.suppress(DockerError),
                ):
                    if container is not None:
                        await container.delete(force=True, v=True)
                    else:  # a create cut off: it may exist all the same
                        await self.docker.containers.container(name).delete(force=True)
            mounts = (HOME_DIR, "/tmp", "/var/tmp", "/dev/shm")
            found = {line.rstrip("\n") for chunk in lines for line in chunk.splitlines()}
            self._writable[image] = sorted(
                p for p in found
                if p.startswith("/") and not any(p == m or p.startswith(m + "/") for m in mounts)
            )

    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        # Nothing reaches the engine here: the tar, written to a spool file
        # (the files are read now, a chunk at a time), rides on runJob's exec.
        drop_spooled(vm, "input_tar")
        try:
            vm.driver_data["input_tar"] = await anyio.to_thread.run_sync(
                self._input_tar, list(inputFiles), vm.image
            )
        except OSError as e:
            raise CopyInError(f"reading input files: {e}", status=e.errno or -1) from e

    def _input_tar(self, files: list[InputFile], image: str | None = None) -> str:
        """The tar of the job's files (and the autodriver), in a spool file: its path."""
        program: tuple[str, bytes] | None = None
        if not self.image_autodriver:
            code = self._compiled.get(image or "")
            program = (AUTODRIVER_PYC_IN_IMAGE, code) if code else (AUTODRIVER_IN_IMAGE,
                                                                     self._autodriver)
        return self.spool.input_tar(files, JOB_DIR, program)

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        self.discard_feedback(vm)  # an earlier job's, never copied out
        if disableNetwork and vm.network == "host":
            # The network is the pool's (fixed at creation); a job that must
            # have none cannot run on a host-network container.
            raise RunJobError("the job disables the network but its pool uses host networking")
        tar = vm.driver_data.pop("input_tar", None)
        if tar is None:
            tar = await anyio.to_thread.run_sync(self._input_tar, [], vm.image)
        try:
            return await self._run_job(vm, Path(tar), runTimeout, maxOutputFileSize)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tar)

    async def _run_job(
        self, vm: TangoMachine, tar: Path, runTimeout: float, maxOutputFileSize: int
    ) -> int:
        memory = self.memory_bytes(vm)
        if self.image_autodriver:
            # Tango's command line: its autodriver knows no other option
            run = [self.image_autodriver, *arguments(
                timeout=runTimeout, max_output=maxOutputFileSize, nproc=self.nproc,
                fsize=self.fsize, job_dir=f"/{JOB_DIR}", tango_only=True,
            )]
        else:
            # -S -E: the autodriver needs no site-packages nor PYTHON* variables,
            # and skipping them is ~10 ms of every job
            script_path = (
                AUTODRIVER_PYC_IN_IMAGE if vm.image in self._compiled else AUTODRIVER_IN_IMAGE
            )
            image_env = self._image_env.get(vm.image or "", {})
            job_env = {k: v for k, v in image_env.items() if k not in NOT_PASSED}
            job_env.update(self.env)
            run = ["python3", "-S", "-E", f"/{script_path}", *arguments(
                timeout=runTimeout, max_output=maxOutputFileSize, nproc=self.nproc,
                fsize=self.fsize, memory=memory, cpu_seconds=self.cpu_seconds,
                user=self.grading_user, partial=PARTIAL_IN_IMAGE, env=job_env, quota=True,
                seccomp=self.seccomp, job_dir=f"/{JOB_DIR}",
            )]
        # One exec: the shell out of the OOM killer's reach (where the engine
        # lets it), the container's one-time setup (the grading user's uid,
        # no writable path on the root file system), an empty home for the
        # grading user (nothing of an earlier job survives in a reused
        # container), the tar from stdin, the autodriver (which removes the
        # user's files elsewhere afterwards).
        script = (
            "{ echo -1000 > /proc/self/oom_score_adj; } 2>/dev/null; "
            f"[ -e {SETUP_MARK} ] || {{ {self._setup_script(vm)} }}; "
            f'find "{HOME_DIR}" -mindepth 1 -delete 2>/dev/null; mkdir -p "/{JOB_DIR}" && '
            f"tar -x -m -o -f - -C / || exit {UNPACK_FAILED}; "
            f'{OOM_COUNT}; b=$n; "$@"; s=$?; {OOM_COUNT}; echo "{OOM_MARK} $b $n" >&2; exit $s'
        )
        cap = maxOutputFileSize + 64 * KIB if maxOutputFileSize else self.feedback_cap
        # The feedback goes to a spool file as it comes (copyOut moves it):
        # a 64 MiB flood never sits in memory.
        feedback = self.spool.feedback(f"feedback-{uuid.uuid4().hex}",
                                       min(cap, self.feedback_cap))
        image = self._image_env.get(vm.image or "", {})
        exec_env = {**SANDBOX_ENV, "PATH": image.get("PATH") or DEFAULT_PATH}
        try:
            code, _, err = await self._exec(
                vm, ["sh", "-c", script, "vmpool", *run], stdin=tar, out=feedback,
                env=exec_env,
            )
            await feedback.finish()
        except BaseException as e:
            feedback.discard()
            if isinstance(e, DockerError):
                raise RunJobError(f"exec in {vm.driver_data.get('cname')}: {e.message}") from e
            # Cancelled (the outer deadline) or failed half-way: stop
            # everything the job started now; the pool destroys the VM.
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(10),
                contextlib.suppress(DockerError),
            ):
                await self._container(vm).kill(signal="SIGKILL")
            if isinstance(e, OSError):  # the spool files (a full disk?)
                raise RunJobError(f"spooling the job's input or feedback: {e}") from e
            raise
        err, oom_killed = _oom_kills(err)
        if code is None or code == UNPACK_FAILED or code >= 126 or not feedback.size:
            if oom_killed and code is not None and code != UNPACK_FAILED:
                # The container ran out of memory and the kernel killed the
                # autodriver itself (it is the biggest process when the job is
                # many small ones). The job's doing, not the VM's: no retry,
                # and the feedback says what happened.
                text = (
                    f"Autodriver: memory limit of {memory} bytes exceeded\n"
                    f"Autodriver: the container ran out of memory and the autodriver was "
                    f"killed (exit {code}); the job's output is lost\n"
                ).encode()
                await anyio.to_thread.run_sync(feedback.path.write_bytes, text)
                vm.feedback = Feedback(path=feedback.path, spooled=True)
                return code
            feedback.discard()
            detail = err.decode(errors="replace").strip()[:500]
            raise RunJobError(
                f"the autodriver did not run (exit {code}): {detail or 'no output'}"
            )
        if oom_killed:
            await anyio.to_thread.run_sync(add_memory_line_to, feedback.path, memory)
        vm.feedback = Feedback(path=feedback.path, spooled=True)
        return code

    def _setup_script(self, vm: TangoMachine) -> str:
        """Shell for a container's first job: the grading user gets the
        container's own uid (and its group that gid), in place, with shell
        builtins only; the image's world-writable paths lose their "other"
        write bit. Marked done by SETUP_MARK."""
        uid = int(vm.driver_data["uid"])
        user = self.grading_user

        def rewrite(path: str, ids: str, skip: int) -> str:
            # the grading user's line "user:pw:<skip fields>rest" becomes
            # "user:pw:<ids>rest"; every other line is kept as it is
            drop = "r=${r#*:}; " * skip
            return (
                f'p=; while IFS= read -r l || [ -n "$l" ]; do case $l in {user}:*) '
                f'r=${{l#*:}}; w=${{r%%:*}}; r=${{r#*:}}; {drop}l="{user}:$w:{ids}$r";; esac; '
                f'p="$p$l\n"; done < {path} && printf %s "$p" > {path}; '
            )

        # passwd: user:pw:uid:gid:gecos:home:shell; group: user:pw:gid:members
        script = rewrite("/etc/passwd", f"{uid}:{uid}:", 2) + rewrite("/etc/group", f"{uid}:", 1)
        writable = self._writable.get(vm.image or "")
        if writable:
            script += f"chmod o-w -- {' '.join(shlex.quote(p) for p in writable)}; "
        return script + f": > {SETUP_MARK};"

    async def _exec(
        self,
        vm: TangoMachine,
        cmd: list[str],
        *,
        stdin: bytes | Path | None = None,
        out_cap: int = 64 * KIB,
        out: Spool | None = None,
        env: Mapping[str, str] | None = None,
    ) -> tuple[int | None, bytes, bytes]:
        """Run ``cmd`` in the container: (exit code, stdout, stderr), capped.

        ``stdin``: bytes, or a file sent a chunk at a time; ``out``: where
        stdout goes instead of memory (then none is returned)."""
        exe = await self._container(vm).exec(
            cmd, stdin=stdin is not None, stdout=True, stderr=True, user="root",
            environment=dict(env if env is not None else SANDBOX_ENV),
        )
        kept, err = bytearray(), bytearray()
        stream = exe.start(detach=False)
        try:
            if isinstance(stdin, Path):
                await send_file(stream.write_in, stdin)
            elif stdin is not None:
                await stream.write_in(stdin)
            if stdin is not None:
                # half-close: the exec sees EOF on stdin, we keep reading
                # (Stream.close() would drop the connection)
                await stream._init()
                assert stream._resp is not None and stream._resp.connection is not None
                transport = stream._resp.connection.transport
                if transport is not None and transport.can_write_eof():
                    transport.write_eof()
            while (msg := await stream.read_out()) is not None:
                if msg.stream == 1 and out is not None:
                    await out.write(msg.data)
                    continue
                buf, cap = (kept, out_cap) if msg.stream == 1 else (err, 64 * KIB)
                if len(buf) < cap:
                    buf += msg.data[: cap - len(buf)]
        finally:
            with anyio.CancelScope(shield=True):
                await stream.close()
        info = await exe.inspect()
        code = info.get("ExitCode")
        return code, bytes(kept), bytes(err)

    async def partialOutput(self, vm: TangoMachine) -> bytes | None:
        """The running job's output so far: one exec, only when asked."""
        if self.image_autodriver or not vm.driver_data.get("cid"):
            return None
        try:
            code, out, _ = await self._exec(vm, ["cat", PARTIAL_IN_IMAGE], out_cap=64 * KIB)
        except DockerError:
            return None
        return out if code == 0 else None

    async def destroyVM(self, vm: TangoMachine) -> None:
        # a job cut short leaves its spool files
        drop_spooled(vm, "input_tar")
        self.discard_feedback(vm)
        container = self._container(vm)
        try:
            await container.delete(force=True, v=True)
        except DockerError as e:
            if e.status == 409:
                # removal already in progress: its end is when the uid is free
                with anyio.move_on_after(30), contextlib.suppress(DockerError):
                    await container.wait(condition="removed")
                try:
                    await self.docker.containers.get(vm.driver_data.get("cid") or
                                                     self.container_name(vm))
                except DockerError as e2:
                    if e2.status != 404:
                        raise DestroyVMError(f"checking container removal: {e2.message}") from e2
                else:
                    return  # still there: the uid stays claimed (a later sweep frees it)
            elif e.status != 404:  # 404: never created, or gone already
                raise DestroyVMError(
                    f"removing container {vm.driver_data.get('cname')}: {e.message}"
                ) from e
        await self._release_uid(vm)

    async def safeDestroyVM(self, vm: TangoMachine) -> None:
        await self.destroyVM(vm)
        try:
            await self.docker.containers.get(vm.driver_data.get("cid") or self.container_name(vm))
        except DockerError as e:
            if e.status == 404:
                return
            raise DestroyVMError(f"checking container removal: {e.message}") from e
        raise DestroyVMError(f"container {vm.driver_data.get('cname')} still exists")

    async def getVMs(self) -> list[TangoMachine]:
        found = await self.docker.containers.list(
            all=True, filters={"label": [f"{LABEL_OWNER}={self.owner}", *self._host_filter()]}
        )
        vms = [self._vm_of(c) for c in found]
        # Claims of this owner with no container at all (a crash between the
        # claim and the create, or between the removal and the release).
        names = {str(vm.driver_data.get("cname")) for vm in vms}
        released = await anyio.to_thread.run_sync(self._release_stale_claims, names)
        if released:
            log.info("docker: released %d grading uids of containers that are gone",
                     len(released))
        return vms

    async def getOrphans(self) -> list[TangoMachine]:
        """Containers (any owner's) whose maker is provably gone: its process
        on this host and boot is dead, or this host rebooted since, or it was
        a driver of this process that is closed. A container made elsewhere
        (another host sharing the engine) or with no mark is left alone."""
        found = await self.docker.containers.list(
            all=True, filters={"label": [LABEL_OWNER, *self._host_filter()]})
        return [
            self._vm_of(c) for c in found
            if liveness.mark_is_dead((c._container.get("Labels") or {}).get(LABEL_PROCESS))
        ]

    def _host_labels(self) -> dict[str, str]:
        return {LABEL_HOST: self.host} if self.host else {}

    def _host_filter(self) -> list[str]:
        return [f"{LABEL_HOST}={self.host}"] if self.host else []

    def _vm_of(self, c: DockerContainer) -> TangoMachine:
        """The VM a listed container is (its labels say which)."""
        labels = c._container.get("Labels") or {}
        names = c._container.get("Names") or []
        vm = TangoMachine(
            name=labels.get(LABEL_POOL, "unknown"),
            image=labels.get(LABEL_IMAGE),
            vmms=self.vmms_name,
            id=int(labels[LABEL_VM]) if labels.get(LABEL_VM, "").isdigit() else None,
            instance_id=c.id,
        )
        vm.driver_data.update(cid=c.id, cname=names[0].lstrip("/") if names else None,
                              owner=labels.get(LABEL_OWNER) or self.owner)
        if labels.get(LABEL_UID, "").isdigit():
            vm.driver_data["uid"] = int(labels[LABEL_UID])
        return vm


def _oom_kills(err: bytes) -> tuple[bytes, bool]:
    """Take the exec shell's OOM counter line out of ``err``: (rest, OOM kill seen)."""
    head, sep, line = err.rstrip(b"\n").rpartition(b"\n")
    if not line.startswith(OOM_MARK.encode()):
        return err, False
    counts = line.split()[1:]
    seen = len(counts) == 2 and all(c.isdigit() for c in counts) and int(counts[1]) > int(
        counts[0]
    )
    return head + sep, seen
