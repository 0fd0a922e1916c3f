"""A courselab's files and their md5s, which Tango's ``open`` answers with.

The md5 of a file is computed once, while it is uploaded (or the first time
``open`` sees a file put there otherwise), and kept with the file itself,
in an extended attribute (``user.vmpool.md5``) that also records the size,
modification time and inode it is the md5 of: ``open`` on a lab of 2,000
handins stats them, it does not read them, and an upload writes nothing
but its own file. On a file system without user attributes the md5 is
computed each time (Tango's way), and ``open`` still answers correctly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

ATTR = "user.vmpool.md5"


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _kept(path: str, st: os.stat_result) -> str | None:
    """The md5 kept with the file, if it is of the file as it is now."""
    try:
        value = os.getxattr(path, ATTR, follow_symlinks=False).decode()
    except (OSError, UnicodeDecodeError):
        return None
    stamp, _, digest = value.rpartition(":")
    return digest if stamp == _stamp(st) and len(digest) == 32 else None


def _keep(path: str, digest: str) -> None:
    with contextlib.suppress(OSError):
        st = os.stat(path, follow_symlinks=False)
        os.setxattr(path, ATTR, f"{_stamp(st)}:{digest}".encode(), follow_symlinks=False)


def lab_md5s(lab: Path) -> dict[str, str]:
    """Every (visible) file of the lab and its md5; reads only files whose
    md5 is not kept with them."""
    found: dict[str, str] = {}
    with os.scandir(lab) as entries:
        for e in entries:
            if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                digest = _kept(e.path, e.stat(follow_symlinks=False))
                if digest is None:
                    digest = md5_of(Path(e.path))
                    _keep(e.path, digest)
                found[e.name] = digest
    return dict(sorted(found.items()))


def record_upload(path: Path, digest: str) -> None:
    """Keep the md5 of a file just put in place (computed as it streamed in)."""
    _keep(str(path), digest)


def known_md5(path: Path) -> str | None:
    """The md5 kept with the file at ``path`` (None if none, or stale)."""
    try:
        return _kept(str(path), os.stat(path, follow_symlinks=False))
    except OSError:
        return None
