"""A simulated VMMS.

Every VMMS call takes a latency drawn from a configurable distribution and
may be made to fail: raise the method's typed error, raise something
unexpected, hang until cancelled, or (runJob) return a given autodriver
status. A record of live VMs — registered when initializeVM *starts*, removed
when destroyVM *finishes* — lets tests prove that nothing leaked, including
creations cancelled half-way. A seed makes a run repeatable.

A job may say what its simulated run does: an input file whose destFile is
``sim-job.json`` (copyIn remembers its localFile; runJob reads it) holds
``{"output": str, "make_status": int, "seconds": float, "exit": int | null}``
(defaults ``""``, 0, 0, null), and runJob then behaves as the autodriver
would for such a job:

- ``exit`` given: it returns that status, the feedback
  ``Autodriver: simulated status N``;
- else it waits ``seconds`` (cancellable; a cancelled runJob leaves nothing
  behind). Longer than runTimeout (when that is > 0): it waits runTimeout
  and returns 2, the feedback ``Autodriver: Job timed out after T seconds``
  and the output; otherwise it returns 0, the feedback
  ``Autodriver: Job exited with status <make_status>`` and the output.
  The output is capped at maxOutputFileSize as the autodriver caps it (the
  first and last half kept, ``...[excess bytes elided]...`` between).

The latency and fault rules of runJob apply before either. Without
``sim-job.json`` every job prints the driver's fixed ``output``.

This driver exists for scheduling logic, benchmarks and tuning; it is not a
stand-in for a real driver's own tests.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import anyio

from vmpool.errors import (
    CopyInError,
    CopyOutError,
    DestroyVMError,
    InitializeVMError,
    RunJobError,
    VMMSError,
    VMNotReadyError,
)
from vmpool.models import InputFile, TangoMachine
from vmpool.vmms import EXIT_OK, EXIT_TIMEOUT, VMMS, Feedback, format_seconds

METHODS = ("initializeVM", "waitVM", "copyIn", "runJob", "copyOut", "destroyVM", "getVMs")

_ERRORS: dict[str, type[VMMSError]] = {
    "initializeVM": InitializeVMError,
    "waitVM": VMNotReadyError,
    "copyIn": CopyInError,
    "runJob": RunJobError,
    "copyOut": CopyOutError,
    "destroyVM": DestroyVMError,
    "getVMs": VMMSError,
}

Action = Literal["raise", "crash", "hang", "status"]
_TOKENS = itertools.count(1)

#: the input file (by destFile) that describes a job's simulated run
SIM_JOB = "sim-job.json"
ELISION = b"\n...[excess bytes elided]...\n"


@dataclass(frozen=True)
class Latency:
    """A latency distribution, in seconds.

    ``Latency.parse`` reads ``"0.05"`` (constant), ``"uniform:0.01,0.05"``,
    ``"exp:0.02"`` (exponential with that mean) and ``"lognormal:MEDIAN,SIGMA"``.
    """

    kind: Literal["const", "uniform", "exp", "lognormal"] = "const"
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self) -> None:
        if self.a < 0 or self.b < 0:
            raise ValueError(f"latency parameters must be >= 0, got {self!r}")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"uniform latency needs low <= high, got {self.a}, {self.b}")

    @classmethod
    def parse(cls, spec: Latency | float | int | str) -> Latency:
        if isinstance(spec, Latency):
            return spec
        if isinstance(spec, int | float):
            return cls("const", float(spec))
        kind, _, args = spec.partition(":")
        try:
            if not args:
                return cls("const", float(kind))
            nums = [float(x) for x in args.split(",")]
            if kind == "uniform" and len(nums) == 2:
                return cls("uniform", nums[0], nums[1])
            if kind == "exp" and len(nums) == 1:
                return cls("exp", nums[0])
            if kind == "lognormal" and len(nums) == 2:
                return cls("lognormal", nums[0], nums[1])
        except ValueError:
            pass
        raise ValueError(
            f"bad latency {spec!r}: use SECONDS, uniform:LO,HI, exp:MEAN or lognormal:MEDIAN,SIGMA"
        )

    def sample(self, rng: random.Random) -> float:
        if self.kind == "const":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return self.a * math.exp(rng.gauss(0.0, self.b)) if self.a > 0 else 0.0


@dataclass
class FaultRule:
    """Make ``method`` fail with ``action``.

    Fires with ``probability`` on each call that matches ``image`` (any if
    None), at most ``times`` times (unlimited if None). ``status`` is what a
    runJob fault of action ``"status"`` returns (3: the autodriver's OS error).
    """

    method: str
    action: Action = "raise"
    probability: float = 1.0
    image: str | None = None
    times: int | None = None
    status: int = 3
    fired: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; one of {', '.join(METHODS)}")
        if self.action not in ("raise", "crash", "hang", "status"):
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.action == "status" and self.method != "runJob":
            raise ValueError("fault action 'status' applies to runJob only")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability}")


@dataclass
class SimWorld:
    """What exists "out there": shared by drivers that stand for one cloud.

    Two SimVMMS with the same world see each other's VMs, which is how a
    test plays a crashed manager (a driver closed with its VMs left) and its
    successor.
    """

    live: dict[str, TangoMachine] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    #: instance name -> the driver that made it; drivers not yet closed
    makers: dict[str, int] = field(default_factory=dict)
    alive: set[int] = field(default_factory=set)


class SimVMMS(VMMS):
    driver_name: ClassVar[str] = "sim"

    def __init__(
        self,
        *,
        owner: str | None = None,
        prefix: str = "local",
        latency: Mapping[str, Latency | float | str] | None = None,
        faults: Sequence[FaultRule] = (),
        seed: int = 0,
        images: Sequence[str] | None = None,
        output: str = "Hello from the simulated job\n",
        world: SimWorld | None = None,
    ) -> None:
        super().__init__(owner=owner, prefix=prefix)
        self.latency: dict[str, Latency] = {m: Latency() for m in METHODS}
        for method, spec in (latency or {}).items():
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
            self.latency[method] = Latency.parse(spec)
        self.faults: list[FaultRule] = list(faults)
        self.rng = random.Random(seed)
        self.images = list(images) if images is not None else None
        self.output = output
        self.world = world or SimWorld()
        self._token = next(_TOKENS)
        self.world.alive.add(self._token)
        self.calls: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self._call_waiters: list[anyio.Event] = []

    # -------------------------------------------------------------- helpers

    @property
    def live(self) -> dict[str, TangoMachine]:
        """Live VMs of this driver's owner, by instance name."""
        return {k.partition("/")[2]: v for k, v in self.world.live.items()
                if self.world.owners[k] == self.owner}

    async def wait_for_calls(self, method: str, n: int) -> None:
        """Wait (no polling) until ``method`` has been called ``n`` times."""
        while self.calls[method] < n:
            ev = anyio.Event()
            self._call_waiters.append(ev)
            await ev.wait()

    def add_fault(self, rule: FaultRule) -> FaultRule:
        self.faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        self.faults.clear()

    async def _step(
        self, method: str, vm: TangoMachine | None, run_timeout: float = 0.0
    ) -> FaultRule | str | None:
        """Count the call, maybe fail it, wait its latency.

        Returns the fired rule for a ``status`` fault, ``"timeout"`` when a
        runJob's latency exceeds ``run_timeout`` (the simulated autodriver
        stops the job then, as the real one does), else None.
        """
        self.calls[method] += 1
        if self._call_waiters:
            waiters, self._call_waiters = self._call_waiters, []
            for ev in waiters:
                ev.set()
        for rule in self.faults:
            if rule.method != method or (rule.times is not None and rule.fired >= rule.times):
                continue
            if rule.image is not None and (vm is None or vm.image != rule.image):
                continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            rule.fired += 1
            self.faults_fired[f"{method}:{rule.action}"] += 1
            if rule.action == "hang":
                await anyio.sleep_forever()
            if rule.action == "crash":
                raise RuntimeError(f"simulated driver bug in {method}")
            if rule.action == "raise":
                raise _ERRORS[method](f"simulated {method} failure")
            return rule
        delay = self.latency[method].sample(self.rng)
        if run_timeout > 0 and delay > run_timeout:
            await anyio.sleep(run_timeout)
            return "timeout"
        if delay > 0:
            await anyio.sleep(delay)
        return None

    def _key(self, vm: TangoMachine) -> str:
        """The VM's key in the world: its owner's and its instance name (two
        owners' VMs of the same id and pool are two VMs)."""
        return vm.instance_id or f"{self.owner}/{self.instanceName(vm.id, vm.name)}"

    def _require_live(self, vm: TangoMachine, error: type[VMMSError]) -> str:
        name = self._key(vm)
        if name not in self.world.live:
            raise error(f"VM {name} does not exist")
        return name

    # ----------------------------------------------------------------- VMMS

    async def getImages(self) -> list[str] | None:
        return None if self.images is None else list(self.images)

    async def initializeVM(self, vm: TangoMachine) -> None:
        name = f"{self.owner}/{self.instanceName(vm.id, vm.name)}"
        if self.images is not None and vm.image not in self.images:
            raise InitializeVMError(f"unknown image {vm.image!r}")
        if name in self.world.live:
            raise InitializeVMError(f"VM {name} already exists")
        # Resources exist from the moment creation starts: a creation that is
        # cancelled half-way and not cleaned up shows as a leak.
        self.world.live[name] = vm
        self.world.owners[name] = self.owner
        self.world.makers[name] = self._token
        vm.instance_id = name
        vm.driver_data["ready"] = False
        await self._step("initializeVM", vm)
        vm.driver_data["ready"] = True

    async def waitVM(self, vm: TangoMachine, max_secs: float) -> None:
        await self._step("waitVM", vm)
        self._require_live(vm, VMNotReadyError)
        if not vm.driver_data.get("ready"):
            raise VMNotReadyError(f"VM {vm.instance_id} was never initialized")

    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        await self._step("copyIn", vm)
        self._require_live(vm, CopyInError)
        vm.driver_data["files"] = [f.destFile for f in inputFiles]
        vm.driver_data.pop("sim_job", None)
        for f in inputFiles:
            if f.destFile == SIM_JOB:
                vm.driver_data["sim_job"] = f.localFile

    async def runJob(
        self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int, disableNetwork: bool
    ) -> int:
        self.discard_feedback(vm)
        # the job's description is this job's only (a runJob without a
        # copyIn before it runs the fixed output)
        spec_file = vm.driver_data.pop("sim_job", None)
        rule = await self._step("runJob", vm, runTimeout)
        self._require_live(vm, RunJobError)
        if rule == "timeout":
            vm.feedback = Feedback(
                data=f"Autodriver: Job timed out after {format_seconds(runTimeout)} seconds\n"
                .encode())
            return EXIT_TIMEOUT
        if isinstance(rule, FaultRule):
            vm.feedback = Feedback(data=f"Autodriver: simulated status {rule.status}\n".encode())
            return rule.status
        if spec_file is not None:
            return await self._run_spec(vm, _read_spec(spec_file), runTimeout, maxOutputFileSize)
        data = ("Autodriver: Job exited with status 0\n" + self.output).encode()
        vm.feedback = Feedback(data=_cap(data, maxOutputFileSize))
        return EXIT_OK

    async def _run_spec(
        self, vm: TangoMachine, spec: _SimJob, runTimeout: float, maxOutputFileSize: int
    ) -> int:
        """runJob for a job that describes its run (``sim-job.json``)."""
        if spec.exit is not None:
            vm.feedback = Feedback(data=f"Autodriver: simulated status {spec.exit}\n".encode())
            return spec.exit
        output = _cap(spec.output.encode(), maxOutputFileSize)
        if runTimeout > 0 and spec.seconds > runTimeout:
            await anyio.sleep(runTimeout)
            self._require_live(vm, RunJobError)
            status = f"Autodriver: Job timed out after {format_seconds(runTimeout)} seconds\n"
            vm.feedback = Feedback(data=status.encode() + output)
            return EXIT_TIMEOUT
        if spec.seconds > 0:
            await anyio.sleep(spec.seconds)
            self._require_live(vm, RunJobError)
        status = f"Autodriver: Job exited with status {spec.make_status}\n"
        vm.feedback = Feedback(data=status.encode() + output)
        return EXIT_OK

    async def copyOut(self, vm: TangoMachine, destFile: str) -> None:
        await self._step("copyOut", vm)
        self._require_live(vm, CopyOutError)
        await super().copyOut(vm, destFile)

    async def destroyVM(self, vm: TangoMachine) -> None:
        self.discard_feedback(vm)
        vm.driver_data.pop("sim_job", None)
        await self._step("destroyVM", vm)
        name = self._key(vm)
        self.world.live.pop(name, None)
        self.world.owners.pop(name, None)
        self.world.makers.pop(name, None)

    async def getVMs(self) -> list[TangoMachine]:
        await self._step("getVMs", None)
        return list(self.live.values())

    async def getOrphans(self) -> list[TangoMachine]:
        """VMs (any owner's) whose driver is closed: its manager is gone."""
        return [vm for k, vm in self.world.live.items()
                if self.world.makers.get(k) not in self.world.alive]

    async def close(self) -> None:
        self.world.alive.discard(self._token)


@dataclass(frozen=True)
class _SimJob:
    """What a ``sim-job.json`` says of the job's simulated run."""

    output: str = ""
    make_status: int = 0
    seconds: float = 0.0
    exit: int | None = None


def _read_spec(path: str) -> _SimJob:
    """The job's ``sim-job.json`` (small: read inline); RunJobError if it is not one."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise RunJobError(f"reading {SIM_JOB} ({path}): {e}") from e
    if not isinstance(raw, dict):
        raise RunJobError(f"{SIM_JOB} ({path}) is not a JSON object")
    problems: list[str] = []
    output = raw.get("output", "")
    if not isinstance(output, str):
        problems.append("output must be a string")
    make_status = raw.get("make_status", 0)
    if not isinstance(make_status, int) or isinstance(make_status, bool):
        problems.append("make_status must be an integer")
    seconds = raw.get("seconds", 0)
    if (not isinstance(seconds, int | float) or isinstance(seconds, bool)
            or not math.isfinite(seconds) or seconds < 0):
        problems.append("seconds must be a number >= 0")
    code = raw.get("exit")
    if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
        problems.append("exit must be an integer or null")
    if problems:
        raise RunJobError(f"{SIM_JOB} ({path}): {'; '.join(problems)}")
    return _SimJob(output=output, make_status=make_status, seconds=float(seconds), exit=code)


def _cap(data: bytes, limit: int) -> bytes:
    """``data`` capped at ``limit`` bytes (0: no cap) as the autodriver caps
    its output: the first and last ``limit // 2`` bytes, the elision marker
    between."""
    if not limit or len(data) <= limit:
        return data
    half = limit // 2
    return data[:half] + ELISION + data[len(data) - half:]
