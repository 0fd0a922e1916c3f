"""The SSH Docker driver: one pool's containers on many Docker hosts."""

from .driver import HostSpec, SSHDockerVMMS

__all__ = ["HostSpec", "SSHDockerVMMS"]
