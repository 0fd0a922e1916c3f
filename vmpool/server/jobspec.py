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
from ..vmms import check_dest_name

#: the longest file name most file systems take, in bytes
NAME_MAX = 255


def check_file_name(name: str | None) -> str | None:
    """The problem with an uploaded or output file name, or None if it is fine."""
    if name is None or name == "":
        return "file name is empty"
    if "\x00" in name:
        return "file name contains a NUL byte"
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
    body: Any, lab: Path, image_problem: str | None = None
) -> tuple[TangoJob | None, list[str]]:
    """An addJob body as a job whose files are in ``lab``, or every problem
    with it (``image_problem``: what the caller found wrong with its image)."""
    problems: list[str] = []
    if not isinstance(body, dict):
        return None, ["the body must be a JSON object"]
    for field in ("image", "jobName", "output_file", "files"):
        if field not in body:
            problems.append(f"missing field '{field}'")
    image = body.get("image")
    if "image" in body and (not isinstance(image, str) or not image):
        problems.append("'image' must be a non-empty string")
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
                               or max_kb <= 0):
        problems.append(f"'max_kb' must be a positive integer, got {max_kb!r}")
        max_kb = None
    callback = body.get("callback_url") or body.get("notifyURL")
    if callback is not None and (not isinstance(callback, str)
                                 or not re.match(r"^https?://", callback)):
        problems.append(f"'callback_url' must be an http(s) URL, got {callback!r}")
        callback = None
    disable_network = body.get("disable_network", False)
    if not isinstance(disable_network, bool):
        problems.append("'disable_network' must be true or false")
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
                      vmms=body.get("vmms") if isinstance(body.get("vmms"), str) else None)
    job = TangoJob(
        vm=vm,
        outputFile=str(lab / "output" / output),
        name=name,
        input=inputs,
        notifyURL=callback,
        timeout=float(timeout),
        maxOutputFileSize=int(max_kb) * 1024 if max_kb else 0,
        accessKeyId=body.get("accessKeyId"),
        accessKey=body.get("accessKey"),
        disableNetwork=bool(disable_network),
    )
    return job, []
