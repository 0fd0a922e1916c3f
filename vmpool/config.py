"""Settings, with Tango's defaults (tango-compat.md section 6)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * KIB


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
    vm_ulimit_file_size: int = 100 * MIB
    vm_ulimit_user_proc: int = 100
    #: warm VMs of a pool made on first use
    pool_size: int = 2
    #: cap on VMs of a pool made on first use (0 = same as pool_size, at least 1)
    pool_max_size: int = 0
    #: VMs created at once per pool
    create_concurrency: int = 4
    #: destroy a VM after one job (Tango's default); False returns it to the pool
    reuse_vms: bool = False
    #: first and largest pause after failed VM creations (doubles each time)
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    prefix: str = "local"
    #: driver used when a job's VM names none
    default_vmms: str = "local"
    #: options handed to each driver's constructor, by driver name
    driver_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                problems.append(f"{f.name} must be >= 0, got {v!r}")
        if self.create_concurrency < 1:
            problems.append(f"create_concurrency must be >= 1, got {self.create_concurrency!r}")
        if self.backoff_initial > self.backoff_max:
            problems.append(
                f"backoff_initial ({self.backoff_initial}) must not exceed backoff_max "
                f"({self.backoff_max})"
            )
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

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
