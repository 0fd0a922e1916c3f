"""The Docker driver: warm containers through aiodocker.

A VM is a started container (``tail -f /dev/null`` under the engine's init)
with vmpool's labels, resource limits, no network (unless the pool's spec
asks for host networking), all capabilities dropped but the few the
autodriver needs, and ``no-new-privileges``.

The engine does about 30 operations a second on two cores whatever the
concurrency, so a job costs it as few round trips as possible: copyIn only
builds a tar in memory, runJob is ONE exec that unpacks that tar (the job's
files and vmpool's autodriver) from its stdin and runs the autodriver,
whose feedback comes back on its stdout and is kept until copyOut writes it
to the host. The exec's exit code is the autodriver's (Tango loses it).

An exec'd process cannot be killed through the engine, so a job's deadline
is enforced twice: by the autodriver inside, and by cancellation outside —
when runJob is cancelled the container is killed at once (and the pool
destroys the VM).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import aiodocker
import anyio
import anyio.to_thread
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from autodriver import COMPILE_PY
from autodriver import SOURCE as AUTODRIVER
from vmpool.config import KIB, MIB
from vmpool.errors import (
    CopyInError,
    CopyOutError,
    DestroyVMError,
    InitializeVMError,
    RunJobError,
    VMNotReadyError,
)
from vmpool.models import InputFile, TangoMachine
from vmpool.vmms import VMMS, add_memory_line, check_input_files, format_seconds, safe_name

JOB_DIR = "home/autograde/autolab"
AUTODRIVER_IN_IMAGE = "opt/vmpool/autodriver.py"
AUTODRIVER_PYC_IN_IMAGE = "opt/vmpool/autodriver.pyc"
#: the autodriver's snapshot of a running job's output (root-only directory)
PARTIAL_IN_IMAGE = "/opt/vmpool/partial"
# What the autodriver needs as root in the container, and nothing else.
CAPS = ["CHOWN", "SETUID", "SETGID", "FOWNER", "KILL", "DAC_OVERRIDE", "DAC_READ_SEARCH"]
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
    ) -> None:
        super().__init__(owner=owner, prefix=prefix)
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
        self.grading_user = grading_user
        self.feedback_cap = feedback_cap
        self._docker: aiodocker.Docker | None = None
        self._autodriver = AUTODRIVER.read_bytes()
        self._owner_tag = hashlib.sha1(self.owner.encode()).hexdigest()[:8]
        self._verified_images: set[str] = set()
        #: the autodriver compiled by each image's Python (unchecked-hash .pyc)
        self._compiled: dict[str, bytes] = {}

    # ----------------------------------------------------------- helpers

    @property
    def docker(self) -> aiodocker.Docker:
        # Made on first use, inside the event loop (aiohttp needs one).
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.url)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            docker, self._docker = self._docker, None
            await docker.close()

    def container_name(self, vm: TangoMachine) -> str:
        # Tango's instance name, made unique per manager on a shared engine.
        return safe_name(f"{self.instanceName(vm.id, vm.name)}-{self._owner_tag}")

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

    # ----------------------------------------------------------- VMMS

    async def initializeVM(self, vm: TangoMachine) -> None:
        if not vm.image:
            raise InitializeVMError("the VM names no image")
        memory = int((vm.memory or self.memory_mb) * MIB)
        network = "host" if vm.network == "host" else "none"
        host_config: dict[str, Any] = {
            "Init": True,
            "Memory": memory,
            "MemorySwap": memory,
            "PidsLimit": self.pids_limit,
            "NetworkMode": network,
            "CapDrop": ["ALL"],
            "CapAdd": CAPS,
            "SecurityOpt": ["no-new-privileges"],
            "Ulimits": [
                {"Name": "core", "Soft": 0, "Hard": 0},
                {"Name": "nofile", "Soft": 4096, "Hard": 4096},
            ],
        }
        if vm.cores:
            host_config["NanoCpus"] = int(vm.cores * 1e9)
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
            },
            "HostConfig": host_config,
        }
        name = self.container_name(vm)
        vm.driver_data["cname"] = name
        try:
            # Not cancellable half-way: a create cut off after the engine made
            # the container would leave one nobody knows the id of. Bounded.
            with anyio.CancelScope(shield=True), anyio.fail_after(60):
                container = await self.docker.containers.create(config, name=name)
            vm.instance_id = container.id
            vm.driver_data["cid"] = container.id
            await container.start()
        except DockerError as e:
            if e.status == 404:
                raise InitializeVMError(f"image {vm.image!r} not found: {e.message}") from e
            raise InitializeVMError(f"creating container {name}: {e.message}") from e

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
            probe += '; python3 -S -E -c "$1" 2>/dev/null || true'
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
        vm.driver_data["verified"] = True
        self._verified_images.add(vm.image or "")
        if out[:4] and out[2:4] == b"\r\n" and vm.image:
            self._compiled[vm.image] = out  # a .pyc: 2 magic bytes, then \r\n

    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        # Nothing reaches the engine here: the tar rides on runJob's exec.
        check_input_files(inputFiles)
        try:
            vm.driver_data["input_tar"] = await anyio.to_thread.run_sync(
                self._input_tar, list(inputFiles), vm.image
            )
        except OSError as e:
            raise CopyInError(f"reading input files: {e}", status=e.errno or -1) from e

    def _input_tar(self, files: list[InputFile], image: str | None = None) -> bytes:
        buf = io.BytesIO()
        now = time.time()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            if not self.image_autodriver:
                code = self._compiled.get(image or "")
                name, program = (
                    (AUTODRIVER_PYC_IN_IMAGE, code) if code else (AUTODRIVER_IN_IMAGE,
                                                                  self._autodriver)
                )
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(program), 0o755, now
                tar.addfile(info, io.BytesIO(program))
            for f in files:
                dest = f"{JOB_DIR}/{os.path.normpath(f.destFile)}"
                with open(f.localFile, "rb") as data:
                    size = os.fstat(data.fileno()).st_size
                    info = tarfile.TarInfo(dest)
                    info.size, info.mode, info.mtime = size, 0o644, now
                    tar.addfile(info, data)
        return buf.getvalue()

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        if disableNetwork and vm.network == "host":
            # The network is the pool's (fixed at creation); a job that must
            # have none cannot run on a host-network container.
            raise RunJobError("the job disables the network but its pool uses host networking")
        data = vm.driver_data.pop("input_tar", None)
        if data is None:
            data = self._input_tar([], vm.image)
        limits = [
            "-u", str(self.nproc), "-f", str(self.fsize), "-t", format_seconds(runTimeout),
            "-o", str(maxOutputFileSize),
        ]
        if self.image_autodriver:
            run = [self.image_autodriver, *limits, f"/{JOB_DIR}"]
        else:
            memory = int((vm.memory or self.memory_mb) * MIB)
            # -S -E: the autodriver needs no site-packages nor PYTHON* variables,
            # and skipping them is ~10 ms of every job
            script_path = (
                AUTODRIVER_PYC_IN_IMAGE if vm.image in self._compiled else AUTODRIVER_IN_IMAGE
            )
            run = ["python3", "-S", "-E", f"/{script_path}", *limits, "--mem", str(memory),
                   "--partial", PARTIAL_IN_IMAGE,
                   "--user", self.grading_user, f"/{JOB_DIR}"]
            if self.cpu_seconds:
                run[4:4] = ["--cpu", str(self.cpu_seconds)]
        # One exec: an empty home for the grading user (nothing of an earlier
        # job survives in a reused container), the tar from stdin, the
        # autodriver (which removes the user's files elsewhere afterwards).
        home = os.path.dirname(f"/{JOB_DIR}")
        script = (
            f'find "{home}" -mindepth 1 -delete 2>/dev/null; mkdir -p "/{JOB_DIR}" && '
            f"tar -x -m -o -f - -C / || exit {UNPACK_FAILED}; "
            f'{OOM_COUNT}; b=$n; "$@"; s=$?; {OOM_COUNT}; echo "{OOM_MARK} $b $n" >&2; exit $s'
        )
        cap = maxOutputFileSize + 64 * KIB if maxOutputFileSize else self.feedback_cap
        try:
            code, out, err = await self._exec(
                vm, ["sh", "-c", script, "vmpool", *run], stdin=data, out_cap=cap
            )
        except DockerError as e:
            raise RunJobError(f"exec in {vm.driver_data.get('cname')}: {e.message}") from e
        except BaseException:
            # Cancelled (the outer deadline) or failed half-way: stop
            # everything the job started now; the pool destroys the VM.
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(10),
                contextlib.suppress(DockerError),
            ):
                await self._container(vm).kill(signal="SIGKILL")
            raise
        err, oom_killed = _oom_kills(err)
        memory = int((vm.memory or self.memory_mb) * MIB)
        if code is None or code == UNPACK_FAILED or code >= 126 or not out:
            if oom_killed and code is not None and code != UNPACK_FAILED:
                # The container ran out of memory and the kernel killed the
                # autodriver itself (it is the biggest process when the job is
                # many small ones). The job's doing, not the VM's: no retry,
                # and the feedback says what happened.
                vm.driver_data["feedback"] = (
                    f"Autodriver: memory limit of {memory} bytes exceeded\n"
                    f"Autodriver: the container ran out of memory and the autodriver was "
                    f"killed (exit {code}); the job's output is lost\n"
                ).encode()
                return code
            detail = err.decode(errors="replace").strip()[:500]
            raise RunJobError(
                f"the autodriver did not run (exit {code}): {detail or 'no output'}"
            )
        if oom_killed:
            out = add_memory_line(out, memory)
        vm.driver_data["feedback"] = out
        return code

    async def _exec(
        self,
        vm: TangoMachine,
        cmd: list[str],
        *,
        stdin: bytes | None = None,
        out_cap: int = 64 * KIB,
    ) -> tuple[int | None, bytes, bytes]:
        """Run ``cmd`` in the container: (exit code, stdout, stderr), capped."""
        exe = await self._container(vm).exec(
            cmd, stdin=stdin is not None, stdout=True, stderr=True, user="root"
        )
        out, err = bytearray(), bytearray()
        stream = exe.start(detach=False)
        try:
            if stdin is not None:
                await stream.write_in(stdin)
                # half-close: the exec sees EOF on stdin, we keep reading
                # (Stream.close() would drop the connection)
                await stream._init()
                assert stream._resp is not None and stream._resp.connection is not None
                transport = stream._resp.connection.transport
                if transport is not None and transport.can_write_eof():
                    transport.write_eof()
            while (msg := await stream.read_out()) is not None:
                buf, cap = (out, out_cap) if msg.stream == 1 else (err, 64 * KIB)
                if len(buf) < cap:
                    buf += msg.data[: cap - len(buf)]
        finally:
            with anyio.CancelScope(shield=True):
                await stream.close()
        info = await exe.inspect()
        code = info.get("ExitCode")
        return code, bytes(out), bytes(err)

    async def partialOutput(self, vm: TangoMachine) -> bytes | None:
        """The running job's output so far: one exec, only when asked."""
        if self.image_autodriver or not vm.driver_data.get("cid"):
            return None
        try:
            code, out, _ = await self._exec(vm, ["cat", PARTIAL_IN_IMAGE], out_cap=64 * KIB)
        except DockerError:
            return None
        return out if code == 0 else None

    async def copyOut(self, vm: TangoMachine, destFile: str) -> None:
        data = vm.driver_data.pop("feedback", None)
        if data is None:
            raise CopyOutError(f"VM {vm.driver_data.get('cname')} has no feedback (no runJob)")
        try:
            await anyio.to_thread.run_sync(_write, destFile, data[: self.feedback_cap])
        except OSError as e:
            raise CopyOutError(f"writing {destFile}: {e}", status=e.errno or -1) from e

    async def destroyVM(self, vm: TangoMachine) -> None:
        try:
            await self._container(vm).delete(force=True, v=True)
        except DockerError as e:
            if e.status == 404:
                return  # never created, or gone already
            if e.status == 409:  # removal already in progress
                return
            raise DestroyVMError(
                f"removing container {vm.driver_data.get('cname')}: {e.message}"
            ) from e

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
            all=True, filters={"label": [f"{LABEL_OWNER}={self.owner}"]}
        )
        vms = []
        for c in found:
            labels = c._container.get("Labels") or {}
            names = c._container.get("Names") or []
            vm = TangoMachine(
                name=labels.get(LABEL_POOL, "unknown"),
                image=labels.get(LABEL_IMAGE),
                vmms=self.driver_name,
                id=int(labels[LABEL_VM]) if labels.get(LABEL_VM, "").isdigit() else None,
                instance_id=c.id,
            )
            vm.driver_data.update(cid=c.id, cname=names[0].lstrip("/") if names else None)
            vms.append(vm)
        return vms

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url}


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


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
