"""addJob bodies and file names: pure functions, no I/O but ``is_file``
checks of a lab's uploads."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import JobError
from ..models import InputFile, TangoJob, TangoMachine, pool_name
from ..vmms import CONTROL_CHARS, check_dest_name

#: the longest file name most file systems take, in bytes
NAME_MAX = 255
#: control characters are never in a name (the core's rule for destFile)
CONTROL = CONTROL_CHARS
#: Tango's VMMS names (tango-cli sends ``vmms: "localDocker"`` by default).
#: Tango ignores the ``vmms`` of addJob and prealloc bodies; so does vmpool
#: for these names (a vmpool driver name still picks that driver).
TANGO_VMMS = frozenset({"localDocker", "distDocker", "ec2SSH", "tashiSSH", "localSSH"})


def check_image_name(image: object) -> str | None:
    """The problem with an image name, or None if it is fine."""
    if not isinstance(image, str) or not image:
        return "'image' must be a non-empty string"
    bad = CONTROL.search(image)
    if bad is not None:
        return f"image name {image!r} contains a control character ({bad.group()!r})"
    if len(image) > 1024:
        return "image name is longer than 1024 characters"
    return None


def vmms_of(body: dict[str, Any]) -> str | None:
    """The driver a body names: a string that is not one of Tango's VMMS names."""
    vmms = body.get("vmms")
    return vmms if isinstance(vmms, str) and vmms not in TANGO_VMMS else None


def check_file_name(name: str | None) -> str | None:
    """The problem with an uploaded or output file name, or None if it is fine."""
    if name is None or name == "":
        return "file name is empty"
    if "\x00" in name:
        return "file name contains a NUL byte"
    bad = CONTROL.search(name)
    if bad is not None:
        return f"file name {name!r} contains a control character ({bad.group()!r})"
    if "/" in name or "\\" in name:
        return f"file name {name!r} contains a '/'"
    if name in (".", "..") or name.startswith(".."):
        return f"file name {name!r} is not allowed"
    try:
        if len(os.fsencode(name)) > NAME_MAX:
            return f"file name is longer than {NAME_MAX} bytes"
    except UnicodeEncodeError:  # a lone surrogate (a "\ud800" JSON escape)
        return f"file name {name!r} is not valid Unicode"
    return None


def lab_problem(key: str, courselab: str) -> str | None:
    """The problem with a courselab name (its folder is ``<key>-<courselab>``)."""
    return check_file_name(courselab) or check_file_name(f"{key}-{courselab}")


def finite(x: float) -> bool:
    """Not NaN nor infinite, and (an int) not too large for a float."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def parse_job(
    body: Any,
    lab: Path,
    image_problem: str | None = None,
    *,
    default_output_bytes: int = 0,
    max_output_bytes: int | None = None,
) -> tuple[TangoJob | None, list[str]]:
    """An addJob body as a job whose files are in ``lab``, or every problem
    with it (``image_problem``: what the caller found wrong with its image).

    ``max_kb`` 0 or absent means ``default_output_bytes`` (tango-cli sends 0
    by default); a larger one is clamped to ``max_output_bytes``. The job's
    ``maxOutputFileSize`` is the value applied, in bytes, as Tango's /jobs
    shows it. ``disable_network`` that is not a boolean (Autolab sends its
    database column, which may be null) means false, as in Tango.
    """
    problems: list[str] = []
    if not isinstance(body, dict):
        return None, ["the body must be a JSON object"]
    for field in ("image", "jobName", "output_file", "files"):
        if field not in body:
            problems.append(f"missing field '{field}'")
    image = body.get("image")
    if "image" in body:
        p = check_image_name(image)
        if p:
            problems.append(p)
    name = body.get("jobName")
    if "jobName" in body and (not isinstance(name, str) or not name):
        problems.append("'jobName' must be a non-empty string")
    output = body.get("output_file")
    if "output_file" in body:
        p = check_file_name(output if isinstance(output, str) else None)
        if p:
            problems.append(f"'output_file': {p}")
    files = body.get("files")
    inputs: list[InputFile] = []
    if "files" in body:
        if not isinstance(files, list) or not files:
            problems.append("'files' must be a non-empty list")
        else:
            for i, f in enumerate(files):
                if not isinstance(f, dict) or not isinstance(f.get("localFile"), str) \
                        or not isinstance(f.get("destFile"), str):
                    problems.append(f"files[{i}] must have string localFile and destFile")
                    continue
                p = check_file_name(f["localFile"])
                if p:
                    problems.append(f"files[{i}].localFile: {p}")
                    continue
                local = lab / f["localFile"]
                if not local.is_file():
                    problems.append(f"input file {f['localFile']} was not uploaded")
                try:
                    check_dest_name(f["destFile"])
                except JobError as e:
                    problems.extend(f"files[{i}]: {p}" for p in e.problems)
                inputs.append(InputFile(str(local), f["destFile"]))
            if not any(f.destFile == "Makefile" for f in inputs):
                problems.append("no file has destFile 'Makefile'")
    timeout = body.get("timeout", 0)
    if timeout is None:
        timeout = 0
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0 \
            or not finite(timeout):
        problems.append(f"'timeout' must be a number >= 0 and finite, got {timeout!r}")
        timeout = 0
    max_kb = body.get("max_kb")
    if max_kb is not None and (isinstance(max_kb, bool) or not isinstance(max_kb, int)
                               or max_kb < 0):
        problems.append(f"'max_kb' must be an integer >= 0 (0: the default), got {max_kb!r}")
        max_kb = None
    output_bytes = max_kb * 1024 if max_kb else default_output_bytes
    if max_output_bytes is not None and output_bytes > max_output_bytes:
        output_bytes = max_output_bytes
    callback = body.get("callback_url") or body.get("notifyURL")
    if callback is not None and (not isinstance(callback, str)
                                 or not re.match(r"^https?://[^/?#\s]", callback)
                                 or CONTROL.search(callback) or " " in callback):
        problems.append(f"'callback_url' must be an http(s) URL, got {callback!r}")
        callback = None
    disable_network = body.get("disable_network") is True
    cores, memory = body.get("cores"), body.get("memory")
    for label, v in (("cores", cores), ("memory", memory)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            problems.append(f"'{label}' must be a positive integer, got {v!r}")
    if isinstance(image, str) and image and image_problem:
        problems.append(image_problem)
    if problems:
        return None, problems
    assert isinstance(image, str) and isinstance(name, str) and isinstance(output, str)
    vm = TangoMachine(name=pool_name(image), image=image, cores=cores, memory=memory,
                      vmms=vmms_of(body))
    # Tango: a job-owned EC2 VM only when accessKey is a non-empty string
    # (tango-cli sends "" for both by default)
    access_key = body.get("accessKey")
    owned = isinstance(access_key, str) and access_key != ""
    job = TangoJob(
        vm=vm,
        outputFile=str(lab / "output" / output),
        name=name,
        input=inputs,
        notifyURL=callback,
        # as given: an integer stays an integer in /jobs, as in Tango
        timeout=timeout,
        maxOutputFileSize=output_bytes,
        accessKeyId=body.get("accessKeyId") if owned else None,
        accessKey=access_key if owned else None,
        disableNetwork=disable_network,
    )
    return job, []
