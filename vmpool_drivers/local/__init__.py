"""The local driver: sandboxes on this host (bubblewrap, dedicated uids, cgroups)."""

from .driver import LocalVMMS

__all__ = ["LocalVMMS"]
