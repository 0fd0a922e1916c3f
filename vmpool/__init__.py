"""vmpool: async warm VM pools and a Tango-compatible job runner for autograding."""

from .config import Settings
from .errors import (
    CopyInError,
    CopyOutError,
    DestroyVMError,
    InitializeVMError,
    JobError,
    NoRoomError,
    PoolClosedError,
    RunJobError,
    UnknownDriverError,
    UnknownImageError,
    UnsafePathError,
    VMMSError,
    VMNotReadyError,
    VMPoolError,
    VMTimeoutError,
)
from .manager import Manager, make_job
from .models import InputFile, TangoJob, TangoMachine
from .pool import Adaptive, Lease, Pool, PoolSpec, PoolStatus
from .registry import available_drivers, load_driver, register_driver
from .scheduler import JobHandle, JobResult, JobState, Outcome, Scheduler
from .vmms import VMMS

__version__ = "0.1.0"

__all__ = [
    "VMMS",
    "Adaptive",
    "CopyInError",
    "CopyOutError",
    "DestroyVMError",
    "InitializeVMError",
    "InputFile",
    "JobError",
    "JobHandle",
    "JobResult",
    "JobState",
    "Lease",
    "Manager",
    "NoRoomError",
    "Outcome",
    "Pool",
    "PoolClosedError",
    "PoolSpec",
    "PoolStatus",
    "RunJobError",
    "Scheduler",
    "Settings",
    "TangoJob",
    "TangoMachine",
    "UnknownDriverError",
    "UnknownImageError",
    "UnsafePathError",
    "VMMSError",
    "VMNotReadyError",
    "VMPoolError",
    "VMTimeoutError",
    "available_drivers",
    "load_driver",
    "make_job",
    "register_driver",
]
