"""The autodriver: the standalone program that runs ``make`` for one grading job inside a VM.

``SOURCE`` is the one file drivers copy into a VM. ``COMPILE_PY`` is a small
program a driver runs with the VM's own Python, the autodriver's source on
its stdin: it prints the compiled module (an unchecked-hash ``.pyc``, which
Python runs directly), so that jobs skip compiling it each time. Python >= 3.7;
older ones fail and the driver keeps the source.

:func:`arguments` builds the autodriver's command line (what follows
``python3 -S -E <script>``): the one place drivers learn its options from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .autodriver import format_seconds

SOURCE = Path(__file__).resolve().with_name("autodriver.py")

COMPILE_PY = """
import os, py_compile, sys, tempfile
src = os.path.join(tempfile.mkdtemp(), "autodriver.py")
with open(src, "wb") as f:
    f.write(sys.stdin.buffer.read())
py_compile.compile(src, cfile=src + "c", doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
with open(src + "c", "rb") as f:
    sys.stdout.buffer.write(f.read())
"""


def env_arguments(env: Mapping[str, str]) -> list[str]:
    """``--env NAME=VALUE`` options for the job's environment, sorted by name.

    Raises ValueError for a name that is empty or holds ``=`` or a NUL byte,
    or a value holding a NUL byte (drivers call it at start to check their
    configured environment once)."""
    args: list[str] = []
    for name, value in sorted(env.items()):
        if not name or "=" in name or "\x00" in name or "\x00" in value:
            raise ValueError(f"bad environment variable {name!r}")
        args += ["--env", f"{name}={value}"]
    return args


def arguments(
    *,
    timeout: float,
    max_output: int,
    nproc: int,
    fsize: int,
    job_dir: str,
    memory: int | None = None,
    cpu_seconds: int | None = None,
    user: str | None = None,
    output: str | None = None,
    partial: str | None = None,
    env: Mapping[str, str] | None = None,
    quota: bool = False,
    seccomp: bool = True,
    cgroup: bool = True,
    tango_only: bool = False,
) -> list[str]:
    """The autodriver's arguments for one job, as its command line reads them.

    ``timeout`` (seconds), ``max_output`` (bytes), ``nproc`` and ``fsize``
    (bytes) are Tango's ``-t -o -u -f`` (0: unlimited) and always come first,
    in Tango's order; ``job_dir`` comes last. The rest are vmpool's options,
    each left out when not asked for: ``memory`` (bytes, ``--mem``),
    ``cpu_seconds`` (``--cpu``; None or 0: no limit), ``user`` (the grading
    user, ``--user``; a ``#UID`` names a bare uid), ``output`` and
    ``partial`` (where the feedback and the running job's output go),
    ``env`` (``--env NAME=VALUE``, checked as :func:`env_arguments` does),
    ``quota`` (``--quota``), ``seccomp=False`` (``--no-seccomp``) and
    ``cgroup=False`` (``--no-cgroup``).

    ``tango_only=True`` gives Tango's own form, ``-u -f -t -o DIRECTORY``,
    for an image's own (Tango) autodriver, which knows no other option;
    asking for any vmpool option with it is a ValueError.
    """
    args = ["-u", str(nproc), "-f", str(fsize), "-t", format_seconds(timeout),
            "-o", str(max_output)]
    extra: list[str] = []
    if memory is not None:
        extra += ["--mem", str(memory)]
    if cpu_seconds:
        extra += ["--cpu", str(cpu_seconds)]
    if user is not None:
        extra += ["--user", user]
    if output is not None:
        extra += ["--output", output]
    if partial is not None:
        extra += ["--partial", partial]
    extra += env_arguments(env or {})
    if quota:
        extra.append("--quota")
    if not seccomp:
        extra.append("--no-seccomp")
    if not cgroup:
        extra.append("--no-cgroup")
    if tango_only and extra:
        raise ValueError(f"Tango's autodriver takes only -u -f -t -o, not {' '.join(extra)}")
    return [*args, *extra, job_dir]


__all__ = ["COMPILE_PY", "SOURCE", "arguments", "env_arguments"]
