"""The output file users read (tango-compat.md section 3)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time

HERE_IS_OUTPUT = "Here is the output from the autograder:\n---"


def autograder_line(msg: str, when: float | None = None) -> str:
    """``Autograder [<ctime>]: <msg>`` plus newline, as Tango writes it."""
    return f"Autograder [{time.asctime(time.localtime(when))}]: {msg}\n"


def temp_path_for(path: str, tag: str) -> str:
    """A hidden file beside ``path`` (same filesystem, so rename is atomic)."""
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.{tag}")


def write_output_atomic(path: str, header: str, body_file: str | None = None) -> None:
    """Write ``header`` then the contents of ``body_file`` to ``path`` atomically.

    The text is written to a hidden file in the same directory and renamed
    into place, so a reader sees either no file or the whole file.
    """
    tmp = temp_path_for(path, f"{os.getpid()}-{id(header):x}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(header.encode("utf-8", "replace"))
            if body_file is not None:
                try:
                    with open(body_file, "rb") as body:
                        shutil.copyfileobj(body, out)
                except FileNotFoundError:
                    pass
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
