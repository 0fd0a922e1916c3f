"""The local driver: VMs are sandboxes on this host (vmpool's embedded default).

Each VM is

- a directory ``<state_dir>/<owner>/<instance>/`` holding ``fs/``, a tmpfs
  with the VM's disk and inode quota (the job directory ``fs/job``, mode
  0700, owned by the VM's uid, and the sandbox's /tmp, /var/tmp and
  /dev/shm), a root-only ``out/`` for the feedback file, the sandbox's
  ``passwd``/``group`` files, a copy of the autodriver, the VM's network
  namespace (``netns``, with its pasta), and ``vm.json`` (so that
  ``getVMs`` finds sandboxes left by a crashed process); while the driver
  lives it holds an ``flock`` on ``<state_dir>/<owner>.lock``, so that a
  later start (whoever's) knows the owner's sandboxes are orphans only once
  that lock is free (:meth:`LocalVMMS.getOrphans`, :mod:`vmpool_drivers.liveness`);
- a dedicated unprivileged uid from ``uid_base`` .. ``uid_base+uid_count-1``,
  claimed host-wide (:class:`vmpool_drivers.policy.UidRegistry`) so that several
  managers and drivers on one host never share one;
- a cgroup (v2, or the v1 ``pids``, ``memory`` and ``cpu`` hierarchies)
  with a pids and a memory limit and an equal CPU share, when the cgroup
  file system is writable.

runJob starts the autodriver inside bubblewrap, with the policy of
:mod:`vmpool_drivers.local.sandbox`: the image's system directories only, the
server's paths covered, a short environment, new pid, ipc, uts and network
namespaces. The autodriver runs as root inside with only the capabilities
it needs to switch to the VM's uid, kill the job's processes and clean up;
the job runs as ``autograde`` (the VM's uid) with no capability, no new
privileges and a seccomp filter. Everything in the pid namespace dies with
the sandbox; destroying the VM unmounts its tmpfs (whatever the job left
there is gone at once, at any depth).

Without bubblewrap the driver refuses to start and names the package, unless
``sandbox="rlimits"`` is asked for explicitly: the autodriver then runs on
the host as root and drops to the VM's uid, with rlimits, the cgroup, the
quota tmpfs for its job directory, no_new_privs and the seccomp filter as
the only fences (no namespaces: the network and the host's files are not
isolated).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
import anyio.abc
import anyio.to_thread

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
from vmpool.vmms import VMMS, Feedback, add_memory_line, safe_name
from vmpool_drivers.liveness import OwnerLock, dead_owner, remove_lock_file
from vmpool_drivers.policy import (
    DEFAULT_DISK_QUOTA,
    DEFAULT_INODE_QUOTA,
    SANDBOX_ENV,
    UID_DIR,
    UidRegistry,
    pids_of_uid,
)

from .cgroups import CgroupSet, cgroup_support
from .sandbox import (
    AUTODRIVER_IN_SANDBOX,
    JOB_DIR_IN_SANDBOX,
    OUT_DIR_IN_SANDBOX,
    JobNet,
    Layout,
    Network,
    bwrap_command,
    create_netns,
    detach,
    is_mount,
    mount_quota,
    pasta_binary,
    remove_netns,
    remove_tree,
)

log = logging.getLogger("vmpool.local")

Sandbox = Literal["bwrap", "rlimits"]


class BubblewrapMissing(InitializeVMError):
    pass


def _default_state_dir() -> str:
    return os.environ.get("VMPOOL_LOCAL_DIR", "/var/lib/vmpool/local")


class LocalVMMS(VMMS):
    driver_name: ClassVar[str] = "local"

    def __init__(
        self,
        *,
        owner: str | None = None,
        prefix: str = "local",
        state_dir: str | None = None,
        sandbox: Sandbox = "bwrap",
        images: dict[str, str] | None = None,
        uid_base: int = 61000,
        uid_count: int = 1000,
        memory_mb: int = 2048,
        pids_max: int = 1024,
        nproc: int = 100,
        fsize: int = 100 * MIB,
        cpu_seconds: int = 0,
        disk_quota: int = DEFAULT_DISK_QUOTA,
        inode_quota: int = DEFAULT_INODE_QUOTA,
        network: Network | Literal["auto"] = "auto",
        hidden_paths: Sequence[str] = (),
        extra_ro_paths: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        seccomp: bool = True,
        python: str | None = None,
        use_cgroups: bool = True,
        uid_dir: str = UID_DIR,
    ) -> None:
        super().__init__(owner=owner, prefix=prefix)
        if safe_name(self.owner) != self.owner or self.owner.startswith("."):
            # it names a directory, uid claims and cgroups
            raise ValueError(f"owner must be made of [A-Za-z0-9_.-] and start with a letter "
                             f"or digit, got {self.owner!r}")
        if sandbox not in ("bwrap", "rlimits"):
            raise ValueError(f"sandbox must be 'bwrap' or 'rlimits', got {sandbox!r}")
        if os.geteuid() != 0:
            raise InitializeVMError(
                "the local driver gives every sandbox its own uid and needs root to do so; "
                f"run vmpool as root (running as uid {os.geteuid()})"
            )
        self.bwrap = shutil.which("bwrap")
        if sandbox == "bwrap" and self.bwrap is None:
            raise BubblewrapMissing(
                "the local driver runs jobs in bubblewrap, which is not installed: "
                "apt-get install bubblewrap (or ask for the degraded mode explicitly with "
                "driver option sandbox='rlimits': no namespaces, rlimits and uids only)"
            )
        if disk_quota < 0 or inode_quota < 0:
            raise ValueError(
                f"disk_quota and inode_quota must be >= 0 (0: none), got {disk_quota}, "
                f"{inode_quota}"
            )
        if network not in ("auto", "pasta", "none", "host-unsafe"):
            raise ValueError(
                f"network must be 'auto', 'pasta', 'none' or 'host-unsafe', got {network!r}"
            )
        self.pasta = pasta_binary()
        if network == "auto":
            network = "pasta" if self.pasta else "none"
            if network == "none":
                log.warning("pasta is not installed (apt-get install passt): jobs that allow "
                            "the network get only a loopback of their own")
        elif network == "pasta" and self.pasta is None:
            raise InitializeVMError(
                "network='pasta' needs pasta, which is not installed: apt-get install passt"
            )
        if network == "host-unsafe":
            log.warning("network='host-unsafe': jobs that allow the network share the host's "
                        "network namespace and reach everything listening on it")
        self.network: Network = network
        self.sandbox: Sandbox = sandbox
        # absolute: the sandbox covers it by path, and bubblewrap binds from it
        self.state_dir = Path(state_dir or _default_state_dir()).absolute()
        # An image names a root file system; by default the host's own.
        self.images = dict(images) if images is not None else {
            "default": "/", "local": "/", "autograding_image": "/",
        }
        for name, root in self.images.items():
            if not Path(root).is_dir():
                raise ValueError(f"image {name!r}: root file system {root} is not a directory")
        # Claims are host-wide (whatever the state directory): two sandboxes
        # sharing a uid could kill each other's processes.
        try:
            self.uids = UidRegistry(uid_base, uid_count, uid_dir)
        except ValueError as e:
            raise ValueError(f"local driver: {e}") from None
        self.uid_dir = self.uids.dir
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.memory_mb = memory_mb
        self.pids_max = pids_max
        self.nproc = nproc
        self.fsize = fsize
        self.cpu_seconds = cpu_seconds
        self.disk_quota = disk_quota
        self.inode_quota = inode_quota or DEFAULT_INODE_QUOTA
        self.env = dict(env or {})
        env_arguments(self.env)  # checked now: a bad name fails at start, not per job
        self.seccomp = seccomp
        # Paths no job may see even where a system directory is bound: the
        # server's (courselabs, database, config), every driver's state.
        self.hidden = [*hidden_paths, str(self.state_dir), str(self.uid_dir), UID_DIR]
        self.extra_ro = [str(Path(p).absolute()) for p in extra_ro_paths]
        # Debian's python3 in /usr/bin, which the sandbox shows; the host's
        # PATH may name one under /root or /home, which it does not.
        self.python = python or ("/usr/bin/python3" if Path("/usr/bin/python3").exists()
                                 else "python3")
        self.cgroups = cgroup_support() if use_cgroups else None
        # a sandbox shares this host: it can have at most what the host has
        self.max_cores = os.cpu_count()
        self.max_memory_mb = _host_memory_mb()
        self._procs: dict[str, anyio.abc.Process] = {}
        #: directory names of the sandboxes this driver made and has not
        #: removed: never orphans, whatever else is under the owner's directory
        self._made: set[str] = set()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o711)
        # Held from before the first sandbox until close (the kernel drops it
        # if the process dies): the proof, for every other process, that the
        # sandboxes under <state_dir>/<owner>/ are not leftovers.
        self._lock = OwnerLock(self.state_dir / f"{self.owner}.lock")
        self._lock_warned = False
        self._take_lock()
        self._owner_dir.mkdir(exist_ok=True)
        os.chmod(self._owner_dir, 0o711)  # whatever the umask
        self._release_stale_claims(self.owner)
        self._remove_stale_cgroups(self.owner)
        self._compiled = self._compile_autodriver()
        if sandbox == "rlimits":
            # No bind mount: the job reaches its directory through the state
            # directory's ancestors, as its own uid.
            closed = _closed_to_others(self.state_dir)
            if closed is not None:
                raise InitializeVMError(
                    f"sandbox='rlimits' runs jobs on the host as their own uid in "
                    f"{self._owner_dir}/<vm>/fs/job, but {closed} is not searchable by other "
                    "users: choose a state_dir outside it (or chmod o+x it)"
                )

    # ----------------------------------------------------------- helpers

    @property
    def _owner_dir(self) -> Path:
        return self.state_dir / self.owner

    def _vm_dir(self, vm: TangoMachine) -> Path:
        return self._owner_dir / safe_name(self.instanceName(vm.id, vm.name))

    def _holder(self, instance: str, owner: str | None = None) -> str:
        return f"{owner or self.owner}/{instance}"

    def _owner_of(self, vm: TangoMachine) -> str:
        """The owner whose sandbox ``vm`` is (another's, for an orphan)."""
        return str(vm.driver_data.get("owner") or self.owner)

    def _take_lock(self) -> bool:
        if self._lock.held:
            return True
        if self._lock.acquire():
            return True
        if not self._lock_warned:
            self._lock_warned = True
            log.warning("owner %s: another live driver holds %s; the sandboxes under %s are "
                        "left to it (this driver reconciles none of them)", self.owner,
                        self._lock.path, self._owner_dir)
        return False

    def _compile_autodriver(self) -> bytes | None:
        """The autodriver compiled by the sandboxes' Python (the host's: images
        here are root file systems, and the default one is the host's own), so
        that jobs skip compiling it; None if that Python cannot."""
        if set(self.images.values()) != {"/"}:
            return None
        try:
            done = subprocess.run(
                [self.python, "-S", "-E", "-c", COMPILE_PY], input=AUTODRIVER.read_bytes(),
                capture_output=True, timeout=60, check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.stdout[2:4] == b"\r\n" else None

    def _release_stale_claims(self, owner: str) -> None:
        """Release uids ``owner`` claimed for sandboxes that no longer exist
        (a crash between claiming and recording, or removing and releasing),
        once no process of them is left."""
        for uid, holder in list(self.uids.claims(f"{owner}/")):
            instance = holder.partition("/")[2]
            if not (self.state_dir / owner / instance).exists():
                _kill_uid(uid)
                if not pids_of_uid(uid):
                    self.uids.release(uid, holder)

    def _cgroup(self, vm: TangoMachine) -> CgroupSet | None:
        if self.cgroups is None:
            return None
        d = vm.driver_data.get("dir")
        instance = Path(d).name if d else self.instanceName(vm.id, vm.name)
        return self.cgroups.for_name(safe_name(f"vmpool-{self._owner_of(vm)}-{instance}"))

    async def getImages(self) -> list[str]:
        return sorted(self.images)

    # ----------------------------------------------------------- VMMS

    async def initializeVM(self, vm: TangoMachine) -> None:
        if vm.image not in self.images:
            raise InitializeVMError(
                f"unknown image {vm.image!r} (local images: {', '.join(sorted(self.images))})"
            )
        instance = self.instanceName(vm.id, vm.name)
        await anyio.to_thread.run_sync(self._create_sandbox, vm, instance)

    def _create_sandbox(self, vm: TangoMachine, instance: str) -> None:
        d = self._vm_dir(vm)
        lay = Layout(d)
        uid: int | None = None
        if not self._lock.held:
            # another driver of this owner held it at start, or this one was
            # closed and is used again
            self._take_lock()
            self._owner_dir.mkdir(mode=0o711, exist_ok=True)
        try:
            d.mkdir(mode=0o711)
        except FileExistsError:
            raise InitializeVMError(f"sandbox {d} already exists") from None
        self._made.add(d.name)
        try:
            try:
                uid = self.uids.claim(self._holder(d.name))
            except LookupError as e:
                raise InitializeVMError(str(e)) from None
            # unique across owners: their sandboxes of one id and pool differ
            vm.instance_id = f"{self.owner}/{instance}"
            vm.driver_data.update(dir=str(d), uid=uid, job=str(lay.job), owner=self.owner)
            self._write_meta(vm)
            lay.fs.mkdir(mode=0o711)
            if self.disk_quota:
                try:
                    mount_quota(lay.fs, self.disk_quota, self.inode_quota)
                except OSError as e:
                    raise InitializeVMError(
                        f"{e.strerror or e} (the local driver puts each VM's files on a tmpfs "
                        "of disk_quota bytes; driver option disk_quota=0 goes without)"
                    ) from None
            lay.job.mkdir(mode=0o700)
            os.chown(lay.job, uid, uid)
            for name in ("tmp", "vartmp", "shm"):
                (lay.fs / name).mkdir()
                os.chmod(lay.fs / name, 0o1777)
            lay.out.mkdir(mode=0o700)
            lay.empty.touch(mode=0o444)
            etc = d / "etc"
            etc.mkdir(mode=0o755)
            (etc / "passwd").write_text(
                "root:x:0:0:root:/root:/bin/sh\n"
                f"autograde:x:{uid}:{uid}:autograde:/home/autograde:/bin/sh\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            )
            (etc / "group").write_text(
                f"root:x:0:\nautograde:x:{uid}:\nnogroup:x:65534:\n"
            )
            if self._compiled:
                (d / "autodriver.py").write_bytes(self._compiled)  # a .pyc; Python runs it
            else:
                shutil.copyfile(AUTODRIVER, d / "autodriver.py")
            os.chmod(d / "autodriver.py", 0o644)
            cg = self._cgroup(vm)
            if cg is not None:
                cg.create(memory_bytes=self.memory_bytes(vm) + 64 * MIB,
                          pids_max=self.pids_max, cores=vm.cores)
            if self.sandbox == "bwrap" and self.network == "pasta":
                assert self.pasta is not None
                try:
                    create_netns(lay, self.pasta)
                except (OSError, subprocess.SubprocessError) as e:
                    raise InitializeVMError(f"the VM's network namespace: {e}") from None
        except BaseException as e:
            self._remove_sandbox(d, uid, vm)
            if isinstance(e, InitializeVMError):
                raise
            raise InitializeVMError(f"creating sandbox {d} failed: {e}") from e

    def _write_meta(self, vm: TangoMachine) -> None:
        meta = {**vm.to_dict(), "driver_data": dict(vm.driver_data), "owner": self.owner}
        path = Path(vm.driver_data["dir"]) / "vm.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path)

    def _sandbox_cmd(self, vm: TangoMachine, argv: list[str], disable_network: bool) -> list[str]:
        d = Path(vm.driver_data["dir"])
        if self.sandbox == "rlimits":
            return argv
        assert self.bwrap is not None
        return bwrap_command(
            self.bwrap, Layout(d), argv,
            root=self.images.get(vm.image or "", "/"),
            net=self._job_net(vm, disable_network),
            hostname=d.name,
            hidden=self.hidden, extra_ro=self.extra_ro,
        )

    def _job_net(self, vm: TangoMachine, disable_network: bool) -> JobNet:
        if disable_network or self.network == "none":
            return "none"
        if self.network == "host-unsafe":
            return "host"
        return "vm"

    def _wrap(self, vm: TangoMachine, cmd: list[str], net: JobNet) -> list[str]:
        """Enter the VM's cgroup and network namespace, shielded from the OOM
        killer (the autodriver sets the job's own score to +1000), then exec
        the sandbox: a shell writes its own pid, then becomes the sandbox (no
        preexec_fn: threads may be running)."""
        steps = ["true"]
        cg = self._cgroup(vm)
        if cg is not None and cg.exists():
            steps += [f'echo $$ > "{p}"' for p in cg.procs_files()]
        prefix = ""
        if net == "vm" and self.sandbox == "bwrap":
            ns = Layout(Path(vm.driver_data["dir"])).netns
            prefix = f'nsenter "--net={ns}" -- '
        # best effort: some kernels refuse negative scores even to root
        script = ("{ echo -1000 > /proc/self/oom_score_adj; } 2>/dev/null; "
                  + " && ".join(steps) + f' && exec {prefix}"$@"')
        return ["/bin/sh", "-c", script, "vmpool-sandbox", *cmd]

    async def _run(
        self, vm: TangoMachine, cmd: list[str], *, limit: int = 64 * KIB
    ) -> tuple[int, bytes]:
        """Run ``cmd``; kill it (and its sandbox) if we are cancelled."""
        key = vm.instance_id or str(vm.id)
        proc = await anyio.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=dict(SANDBOX_ENV),
        )
        self._procs[key] = proc
        out = bytearray()
        try:
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                if len(out) < limit:
                    out += chunk[: limit - len(out)]
            code = await proc.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                _kill_group(proc.pid)
                with anyio.move_on_after(5):
                    await proc.wait()
            raise
        finally:
            self._procs.pop(key, None)
            with contextlib.suppress(Exception):
                await proc.aclose()
        return code, bytes(out)

    async def waitVM(self, vm: TangoMachine, max_secs: float) -> None:
        d = vm.driver_data.get("dir")
        if not d or not Layout(Path(d)).job.is_dir():
            raise VMNotReadyError(f"sandbox of {vm.instance_id or vm.id} does not exist")
        if vm.driver_data.get("verified"):
            return
        # Start the sandbox once: proves bubblewrap, namespaces and the
        # cgroup work here, before a job depends on it.
        cmd = self._wrap(vm, self._sandbox_cmd(vm, [self.python, "-c", "pass"], True), "none")
        code, out = await self._run(vm, cmd)
        if code != 0:
            raise VMNotReadyError(
                f"sandbox {vm.instance_id} does not start (exit {code}): "
                f"{out.decode(errors='replace').strip()[:500]}"
            )
        vm.driver_data["verified"] = True

    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        d = vm.driver_data.get("dir")
        if not d:
            raise CopyInError(f"VM {vm.id} has no sandbox")
        await anyio.to_thread.run_sync(self._copy_in, Layout(Path(d)).job,
                                       vm.driver_data["uid"], list(inputFiles))

    @staticmethod
    def _copy_in(job: Path, uid: int, files: list[InputFile]) -> None:
        for f in files:
            rel = Path(os.path.normpath(f.destFile))
            try:
                # Never write or chown through a link the job may have left
                # (a reused sandbox): each directory on the way is checked.
                d = job
                for part in rel.parts[:-1]:
                    d = d / part
                    if d.is_symlink() or (d.exists() and not d.is_dir()):
                        d.unlink()
                    d.mkdir(exist_ok=True)
                    os.lchown(d, uid, uid)
                dest = d / rel.name
                if dest.is_symlink():
                    dest.unlink()
                shutil.copyfile(f.localFile, dest, follow_symlinks=True)
                os.lchown(dest, uid, uid)
            except OSError as e:
                raise CopyInError(f"copying {f.localFile} to {f.destFile}: {e.strerror or e}",
                                  status=e.errno or -1) from e

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        self.discard_feedback(vm)
        d = vm.driver_data.get("dir")
        uid = vm.driver_data.get("uid")
        if not d or uid is None:
            raise RunJobError(f"VM {vm.id} has no sandbox")
        lay = Layout(Path(d))
        feedback = lay.out / "feedback"
        for stale in (feedback, lay.out / "partial"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        mem = self.memory_bytes(vm)
        if self.sandbox == "bwrap":
            script, user, job = AUTODRIVER_IN_SANDBOX, "autograde", JOB_DIR_IN_SANDBOX
            out_dir = OUT_DIR_IN_SANDBOX
        else:
            script, user, job = str(lay.d / "autodriver.py"), f"#{uid}", str(lay.job)
            out_dir = str(lay.out)
        argv = [self.python, "-S", "-E", script, *arguments(
            timeout=runTimeout, max_output=maxOutputFileSize, nproc=self.nproc,
            fsize=self.fsize, memory=mem, cpu_seconds=self.cpu_seconds, user=user,
            output=f"{out_dir}/feedback", partial=f"{out_dir}/partial", env=self.env,
            quota=bool(self.disk_quota), seccomp=self.seccomp, cgroup=False, job_dir=job,
        )]
        net = self._job_net(vm, disableNetwork)
        cmd = self._wrap(vm, self._sandbox_cmd(vm, argv, disableNetwork), net)
        cg = self._cgroup(vm)
        oom_before = cg.oom_kills() if cg is not None else 0
        code, out = await self._run(vm, cmd)
        if not feedback.exists():
            text = out.decode(errors="replace").strip()
            raise RunJobError(
                f"the sandbox did not run the autodriver (exit {code}): {text[:500]}"
            )
        if cg is not None and cg.oom_kills() > oom_before:
            # the cgroup OOM-killed something the autodriver did not see
            with contextlib.suppress(OSError):
                feedback.write_bytes(add_memory_line(feedback.read_bytes(), mem))
        vm.feedback = Feedback(path=feedback)  # the sandbox's: copied out, capped
        return code

    async def partialOutput(self, vm: TangoMachine) -> bytes | None:
        d = vm.driver_data.get("dir")
        if not d:
            return None
        try:
            return await anyio.Path(d, "out", "partial").read_bytes()
        except OSError:
            return None

    async def destroyVM(self, vm: TangoMachine) -> None:
        self.discard_feedback(vm)
        key = vm.instance_id or self.instanceName(vm.id, vm.name)
        proc = self._procs.pop(key, None)
        if proc is not None:
            _kill_group(proc.pid)
        d = Path(vm.driver_data.get("dir") or self._vm_dir(vm))
        await anyio.to_thread.run_sync(self._remove_sandbox, d, vm.driver_data.get("uid"), vm)

    def _remove_sandbox(self, d: Path, uid: int | None, vm: TangoMachine) -> None:
        owner = self._owner_of(vm)
        holder = self._holder(d.name, owner)
        cg = self._cgroup(vm)
        if cg is not None:
            cg.kill_all()
        mine = uid is not None and self.uids.holds(uid, holder)
        if uid is not None and not mine:
            # The claim names another sandbox now (or none): its processes
            # are not this VM's to kill, nor its uid this VM's to free.
            log.warning("sandbox %s: uid %s is no longer claimed for it (claim: %s); "
                        "leaving its processes and claim alone", d, uid, self.uids.holder(uid))
        if mine:
            assert uid is not None
            _kill_uid(uid)
            left = pids_of_uid(uid)
            if left:
                raise DestroyVMError(
                    f"sandbox {d}: processes of uid {uid} survive SIGKILL "
                    f"({', '.join(map(str, left[:10]))}); the VM and its uid are kept "
                    "(leaked) rather than handed to another job"
                )
        lay = Layout(d)
        try:
            remove_netns(lay)
            if is_mount(lay.fs):
                detach(lay.fs)  # everything the job left, at any depth, in one call
            remove_tree(d)
        except OSError as e:
            raise DestroyVMError(f"sandbox {d} could not be removed: {e}") from e
        if owner == self.owner:
            self._made.discard(d.name)
        if cg is not None:
            cg.remove()
        if mine:
            assert uid is not None
            self.uids.release(uid, holder)
        if owner != self.owner:
            # an orphan: its owner's directory and lock go with its last sandbox
            self._remove_owner_if_empty(owner)

    async def safeDestroyVM(self, vm: TangoMachine) -> None:
        await self.destroyVM(vm)
        d = str(vm.driver_data.get("dir") or self._vm_dir(vm))
        if await anyio.Path(d).exists():
            raise DestroyVMError(f"sandbox {d} still exists after destroy")

    async def getVMs(self) -> list[TangoMachine]:
        return await anyio.to_thread.run_sync(self._scan, self.owner)

    async def getOrphans(self) -> list[TangoMachine]:
        return await anyio.to_thread.run_sync(self._orphans)

    def _orphans(self) -> list[TangoMachine]:
        """Sandboxes whose owner is gone: this owner's that this driver did not
        make (while it holds the owner's lock, whoever made them is gone), and
        those of every other owner whose lock nobody holds. A dead owner's
        uid claims and cgroups with no sandbox left are released on the way,
        and its directory and lock removed once empty."""
        found: list[TangoMachine] = []
        if self._take_lock():
            found += [vm for vm in self._scan(self.owner)
                      if Path(vm.driver_data["dir"]).name not in self._made]
        for entry in sorted(self.state_dir.iterdir()):
            owner = entry.name
            if owner == self.owner or not entry.is_dir() or entry.is_symlink():
                continue
            with dead_owner(self._lock_path(owner)) as dead:
                if not dead:
                    # alive, or not a driver that locks (nothing is proven)
                    continue
                vms = self._scan(owner)
                log.info("owner %s is gone: %d sandboxes of it left", owner, len(vms))
                self._release_stale_claims(owner)
                self._remove_stale_cgroups(owner)
                if not vms:
                    self._remove_owner_dir(owner)
                found += vms
        return found

    def _lock_path(self, owner: str) -> Path:
        return self.state_dir / f"{owner}.lock"

    def _remove_owner_if_empty(self, owner: str) -> None:
        with dead_owner(self._lock_path(owner)) as dead:
            if dead:
                self._remove_owner_dir(owner)

    def _remove_owner_dir(self, owner: str) -> None:
        """Remove ``owner``'s empty directory, then its lock file (the caller
        holds the lock)."""
        try:
            (self.state_dir / owner).rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return  # not empty: a sandbox is left (a later start tries again)
        remove_lock_file(self._lock_path(owner))

    async def close(self) -> None:
        """Let the owner's lock go: the sandboxes left (none, after a clean
        close) are then anyone's to remove. Nothing is destroyed here."""
        if self._lock.held:
            await anyio.to_thread.run_sync(self._release_lock)

    def _release_lock(self) -> None:
        try:
            self._owner_dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            self._lock.release()  # sandboxes left: the lock file says whose
            return
        self._lock.release(remove=True)

    def _scan(self, owner: str) -> list[TangoMachine]:
        vms: list[TangoMachine] = []
        owner_dir = self.state_dir / owner
        if not owner_dir.is_dir():
            return vms
        for d in sorted(owner_dir.iterdir()):
            try:
                meta = json.loads((d / "vm.json").read_text())
            except (OSError, ValueError):
                # a sandbox whose creation (or removal) was cut short: still
                # ours to remove, with its id (hence its cgroup) and its uid
                meta = self._meta_from_name(d.name, owner)
            data = meta.pop("driver_data", {}) or {}
            meta.pop("owner", None)
            fields = {k: v for k, v in meta.items() if k in TangoMachine.__dataclass_fields__}
            vm = TangoMachine(**fields)
            vm.driver_data.update(data)
            # where it is says whose it is, whatever its vm.json says
            vm.driver_data.update(dir=str(d), owner=owner)
            vm.instance_id = f"{owner}/{d.name}"
            vms.append(vm)
        return vms

    def _meta_from_name(self, instance: str, owner: str) -> dict[str, Any]:
        """What a sandbox's directory name and its uid claim say of it."""
        meta: dict[str, Any] = {"name": instance, "driver_data": {}}
        m = re.fullmatch(rf"{re.escape(self.prefix)}-(\d+)-(.+)", instance)
        if m:
            meta.update(id=int(m.group(1)), name=m.group(2))
        holder = self._holder(instance, owner)
        for uid, claimed in self.uids.claims(holder):
            if claimed == holder:
                meta["driver_data"]["uid"] = uid
                break
        return meta

    def _remove_stale_cgroups(self, owner: str) -> None:
        """Remove ``owner``'s cgroups whose sandbox is gone (a crash between
        removing the sandbox's directory and its cgroup)."""
        if self.cgroups is None:
            return
        mine = safe_name(f"vmpool-{owner}-{self.prefix}-")
        found: set[str] = set()
        for parent in self.cgroups.parents.values():
            with contextlib.suppress(OSError):
                found |= {p.name for p in parent.iterdir()
                          if p.is_dir() and p.name.startswith(mine)}
        # every sandbox on this state directory, whoever's: an owner whose
        # name begins with this one's never loses a cgroup to it
        live: set[str] = set()
        for o in self.state_dir.iterdir():
            if o.is_dir() and not o.is_symlink():
                with contextlib.suppress(OSError):
                    live |= {safe_name(f"vmpool-{o.name}-{d.name}") for d in o.iterdir()}
        for name in sorted(found - live):
            cg = self.cgroups.for_name(name)
            cg.kill_all()
            cg.remove()


def _host_memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _closed_to_others(path: Path) -> Path | None:
    """The first directory from / down to ``path`` that other users cannot search."""
    path = path.resolve()
    for d in [*reversed(path.parents), path]:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid`` (the VM's dedicated uid), bounded."""
    for _ in range(20):
        pids = pids_of_uid(uid)
        if not pids:
            return
        pid = os.fork()
        if pid == 0:  # child: become the uid, signal everything it may signal
            try:
                os.setgid(uid)
                os.setuid(uid)
                if os.getuid() == uid and os.geteuid() == uid:
                    os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.01)  # SIGKILLed tasks need a moment to exit


if sys.platform != "linux":  # pragma: no cover
    raise ImportError("the local driver runs on Linux only")
