"""Tango's data objects, with Tango's field names.

These are what drivers receive and what the REST API reports, so the names
are Tango's (camelCase included) rather than PEP 8.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .vmms import Feedback

_ctime_cache: tuple[int, str] = (0, "")


def ctime_now() -> str:
    """``time.asctime()`` of now, computed once a second (it is on every job's hot path)."""
    global _ctime_cache
    now = int(time.time())
    if now != _ctime_cache[0]:
        _ctime_cache = (now, time.asctime(time.localtime(now)))
    return _ctime_cache[1]


@dataclass
class InputFile:
    """One file to copy into a VM: ``localFile`` on the host, ``destFile`` in the VM."""

    localFile: str
    destFile: str


@dataclass
class TangoMachine:
    """A VM, or the description of the VMs of one pool.

    ``name`` is the pool key: the image name with any extension stripped.
    ``id`` is the VM's number, unique within one manager; drivers name the
    instance ``<prefix>-<id>-<name>``.
    """

    name: str = "DefaultTestVM"
    image: str | None = None
    vmms: str | None = None
    network: str | None = None
    cores: int | None = None
    memory: int | None = None
    disk: int | None = None
    domain_name: str | None = None
    ec2_id: str | None = None
    resume: bool | None = None
    id: int | None = None
    instance_id: str | None = None
    # Driver-private state (container id, sandbox path, ...). Not part of
    # Tango's object; never reported over the API.
    driver_data: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The autodriver's output of the last runJob, held on the host until
    # copyOut takes it (see vmpool.vmms.Feedback). Not part of Tango's
    # object; never reported over the API nor serialised by to_dict.
    feedback: Feedback | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "vmms": self.vmms,
            "network": self.network,
            "cores": self.cores,
            "memory": self.memory,
            "disk": self.disk,
            "domain_name": self.domain_name,
            "ec2_id": self.ec2_id,
            "resume": self.resume,
            "id": self.id,
            "instance_id": self.instance_id,
        }


@dataclass
class TangoJob:
    """A grading job, as Tango defines it.

    ``timeout`` 0 means the configured default; ``maxOutputFileSize`` is in
    bytes (0 means the configured default).
    """

    vm: TangoMachine
    outputFile: str
    name: str
    input: list[InputFile] = field(default_factory=list)
    notifyURL: str | None = None
    timeout: float = 0
    maxOutputFileSize: int = 0
    accessKeyId: str | None = None
    accessKey: str | None = None
    disableNetwork: bool = True
    id: int | None = None
    assigned: bool = False
    retries: int = 0
    trace: list[str] = field(default_factory=list)
    #: the course/lab the job belongs to (the server's courselab): pools
    #: share their VMs fairly between courselabs. Not part of Tango's object.
    courselab: str | None = None

    def log(self, text: str) -> None:
        """Append a ``<ctime>|<text>`` line to the job's trace, as Tango does."""
        self.trace.append(f"{ctime_now()}|{text}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "outputFile": self.outputFile,
            "notifyURL": self.notifyURL,
            "maxOutputFileSize": self.maxOutputFileSize,
            "assigned": self.assigned,
            "timeout": self.timeout,
            "retries": self.retries,
            "trace": list(self.trace),
            "vm": self.vm.to_dict(),
            "input": [{"localFile": f.localFile, "destFile": f.destFile} for f in self.input],
        }


#: disk-image extensions Tango's VMMSs name images with; only these are stripped
IMAGE_EXTENSIONS = frozenset({".img", ".qcow2", ".qcow", ".raw", ".vmdk", ".vdi", ".iso"})


def pool_name(image: str) -> str:
    """Tango's pool key: the image name with its extension stripped
    (``autograding_image.img`` -> ``autograding_image``).

    Tango strips whatever follows the last ``.`` (``os.path.splitext``),
    which makes one pool of ``grader:1.1`` and ``grader:1.2``; here only a
    disk-image extension is stripped, so that Docker tags with dots stay
    distinct pools while the names Tango users see for VM images are kept.
    """
    stem, ext = os.path.splitext(image)
    return stem if stem and ext.lower() in IMAGE_EXTENSIONS else image
