"""The Docker driver: warm containers through aiodocker."""

from .driver import DockerVMMS

__all__ = ["DockerVMMS"]
