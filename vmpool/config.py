"""Settings, with Tango's defaults (tango-compat.md section 6)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * KIB


def pool_problems(
    *,
    min_idle: object,
    max_size: object,
    create_concurrency: object,
    initializevm_timeout: float,
    waitvm_timeout: float,
    destroy_timeout: float,
    backoff_initial: float,
    backoff_max: float,
) -> list[str]:
    """What is wrong with a pool's settings: the rules a Pool applies, also
    applied to Settings at start (a bad value is refused there, once, naming
    the setting, not by every addJob that would make a pool)."""
    problems = []
    if not isinstance(min_idle, int) or min_idle < 0:
        problems.append(f"min_idle must be an int >= 0, got {min_idle!r}")
    if not isinstance(max_size, int) or max_size < 0:
        problems.append(f"max_size must be an int >= 0, got {max_size!r}")
    elif isinstance(min_idle, int) and max_size < min_idle:
        problems.append(f"max_size ({max_size}) must be >= min_idle ({min_idle})")
    if not isinstance(create_concurrency, int) or create_concurrency < 1:
        problems.append(f"create_concurrency must be an int >= 1, got {create_concurrency!r}")
    for label, value in (
        ("initializevm_timeout", initializevm_timeout),
        ("waitvm_timeout", waitvm_timeout),
        ("destroy_timeout", destroy_timeout),
    ):
        if not value > 0:
            problems.append(f"{label} must be > 0, got {value!r}")
    if not 0 < backoff_initial <= backoff_max:
        problems.append(
            f"need 0 < backoff_initial <= backoff_max, got {backoff_initial!r}, {backoff_max!r}"
        )
    return problems


@dataclass
class Settings:
    #: system errors are retried on a fresh VM this many times
    job_retries: int = 2
    waitvm_timeout: float = 60.0
    #: a job with timeout 0 gets this one
    runjob_timeout: float = 60.0
    #: runJob is cancelled (and the VM destroyed) this long after the job's
    #: own timeout: the autodriver inside is expected to stop the job first
    runjob_grace: float = 5.0
    initializevm_timeout: float = 180.0
    copyin_timeout: float = 30.0
    copyout_timeout: float = 30.0
    #: bound on destroying one VM (cleanup is bounded too)
    destroy_timeout: float = 30.0
    max_output_file_size: int = 1000 * KIB
    #: Tango's VM_ULIMIT_FILE_SIZE and VM_ULIMIT_USER_PROC: the autodriver's
    #: -f and -u, handed to drivers that take ``fsize`` / ``nproc`` (unless
    #: their own options say otherwise)
    vm_ulimit_file_size: int = 100 * MIB
    vm_ulimit_user_proc: int = 100
    #: pools a job's spec may make (an image, cores, memory) beyond those
    #: made on purpose: at most this many, with no warm VM, dropped once idle
    max_implicit_pools: int = 16
    implicit_pool_idle: float = 600.0
    #: warm VMs of a pool made on first use
    pool_size: int = 2
    #: cap on VMs of a pool made on first use (0 = same as pool_size, at least 1)
    pool_max_size: int = 0
    #: VMs created at once per pool
    create_concurrency: int = 4
    #: free VMs over a pool's warm size are kept this long once idle, for
    #: the next burst, then destroyed (0: at once)
    idle_timeout: float = 0.0
    #: adaptive sizing for every pool (vmpool.Adaptive): the warm target
    #: follows the arrival rate, between pool_size and the pool's cap;
    #: margin (Poisson standard deviations), hold (s idle before an extra
    #: VM goes) and the rate's half-life (s)
    adaptive: bool = False
    adaptive_margin: float = 2.0
    adaptive_hold: float = 300.0
    adaptive_halflife: float = 300.0
    #: destroy a VM after one job (Tango's default); False returns it to the pool
    reuse_vms: bool = False
    #: first and largest pause after failed VM creations (doubles each time)
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    prefix: str = "local"
    #: driver used when a job's VM names none
    default_vmms: str = "local"
    #: write output files in the event loop instead of the writer thread
    #: (simulations under a virtual clock, vmpool.load: a thread's wait
    #: would let the clock jump); never for a server
    output_in_loop: bool = False
    #: options handed to each driver's constructor, by driver name
    driver_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                problems.append(f"{f.name} must be >= 0, got {v!r}")
        if not self.adaptive_halflife > 0:
            problems.append(f"adaptive_halflife must be > 0, got {self.adaptive_halflife!r}")
        for name in ("runjob_timeout", "copyin_timeout", "copyout_timeout"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        # what every pool made from these settings must accept
        size = self.pool_size
        cap = self.pool_max_size or max(size, 1)
        for p in pool_problems(
            min_idle=size, max_size=max(cap, size),
            create_concurrency=self.create_concurrency,
            initializevm_timeout=self.initializevm_timeout,
            waitvm_timeout=self.waitvm_timeout, destroy_timeout=self.destroy_timeout,
            backoff_initial=self.backoff_initial, backoff_max=self.backoff_max,
        ):
            problems.append(p.replace("min_idle", "pool_size").replace("max_size", "pool_max_size"))
        if problems:
            raise ValueError("invalid settings: " + "; ".join(dict.fromkeys(problems)))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``VMPOOL_<NAME>`` environment variables, then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get("VMPOOL_" + f.name.upper())
            if raw is None or f.name == "driver_options":
                continue
            kind = type(getattr(cls(), f.name))
            try:
                if kind is bool:
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    values[f.name] = kind(raw)
            except ValueError as e:
                raise ValueError(
                    f"environment variable VMPOOL_{f.name.upper()}={raw!r}: {e}"
                ) from None
        values.update(overrides)
        return cls(**values)
