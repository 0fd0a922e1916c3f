"""A courselab's files and their md5s, which Tango's ``open`` answers with.

The md5s are computed once (at upload, or the first time ``open`` sees a
file put there otherwise) and kept in an index beside the lab's folder
(``<courselabs>/.md5s/<lab>.json``, never among the lab's own files), keyed
by name, size, modification time and inode: ``open`` on a lab of 2,000
handins stats them, it does not read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

INDEX_DIR = ".md5s"
_lock = threading.Lock()  # index updates, across the threads that serve routes


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _index(lab: Path) -> Path:
    return lab.parent / INDEX_DIR / f"{lab.name}.json"


def _load(lab: Path) -> dict[str, list[object]]:
    try:
        data = json.loads(_index(lab).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(lab: Path, index: dict[str, list[object]]) -> None:
    path = _index(lab)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        json.dump(index, f)
    os.replace(tmp, path)


def lab_md5s(lab: Path) -> dict[str, str]:
    """Every (visible) file of the lab and its md5; reads only files the index lacks."""
    with _lock:
        index = _load(lab)
        found: dict[str, str] = {}
        fresh: dict[str, list[object]] = {}
        with os.scandir(lab) as entries:
            for e in entries:
                if e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError):
                    key = _key(e.stat(follow_symlinks=False))
                    known = index.get(e.name)
                    if known is not None and known[:3] == key and isinstance(known[3], str):
                        digest = known[3]
                    else:
                        digest = md5_of(Path(e.path))
                    found[e.name] = digest
                    fresh[e.name] = [*key, digest]
        if fresh != index:
            with contextlib.suppress(OSError):
                _save(lab, fresh)
        return dict(sorted(found.items()))


def record_upload(lab: Path, name: str, digest: str) -> None:
    """Note the md5 of a file just put in place (its md5 was computed while
    it streamed in: it is never read again for ``open``)."""
    with _lock:
        index = _load(lab)
        with contextlib.suppress(OSError):
            index[name] = [*_key(os.stat(lab / name)), digest]
            _save(lab, index)


def known_md5(lab: Path, name: str) -> str | None:
    """The md5 of the lab's file ``name`` if the index knows it (unchanged since)."""
    with _lock:
        known = _load(lab).get(name)
    try:
        key = _key(os.stat(lab / name))
    except OSError:
        return None
    if known is not None and known[:3] == key and isinstance(known[3], str):
        return known[3]
    return None
