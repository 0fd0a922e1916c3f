"""Typed errors.

Two families: ``VMMSError`` is a *system* error raised by a driver (the job
is retried on a fresh VM), ``JobError`` is a problem with what the user asked
for (reported at once, nothing runs).
"""

from __future__ import annotations


class VMPoolError(Exception):
    """Base of every error vmpool raises on purpose."""


# --- driver (system) errors: the VM is in doubt, the job is retried -----------


class VMMSError(VMPoolError):
    """A driver failed to do what a VMMS method asks. The VM is in doubt."""

    #: the value Tango would record for the step in ``Job status: ...``
    status: int = -1

    def __init__(self, message: str, *, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


class InitializeVMError(VMMSError):
    """The VM could not be created."""


class NoRoomError(InitializeVMError):
    """The driver has no room for another VM now (its hosts are full,
    draining or down): not the job's fault nor the VM's. The pool keeps its
    jobs waiting and tries again when one of its VMs is gone, or after its
    backoff."""


class VMNotReadyError(VMMSError):
    """``waitVM`` found the VM unable to run jobs."""


class CopyInError(VMMSError):
    """Copying the job's input files into the VM failed."""


class RunJobError(VMMSError):
    """The autodriver could not be started or its result could not be read."""


class CopyOutError(VMMSError):
    """Copying the feedback file out of the VM failed."""


class DestroyVMError(VMMSError):
    """The VM could not be removed (or could not be shown to be gone)."""


class VMTimeoutError(VMMSError):
    """A VMMS step did not finish within its deadline and was cancelled."""

    def __init__(self, step: str, seconds: float) -> None:
        super().__init__(f"{step} timed out after {seconds:g} s", status=-1)
        self.step = step
        self.seconds = seconds


# --- user errors: reported at once, nothing runs ---------------------------------


class JobError(VMPoolError, ValueError):
    """The job as submitted cannot run. ``problems`` names each one."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class UnsafePathError(JobError):
    """A file name that would escape the job directory (``..``, absolute, empty, NUL)."""


class UnknownImageError(JobError):
    """No pool can be made for the job's image."""


class UnknownDriverError(VMPoolError, LookupError):
    """No driver is registered under the requested name."""


class PoolClosedError(VMPoolError):
    """The pool (or scheduler) is closed and takes no more work."""
