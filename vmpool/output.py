"""The output file users read (tango-compat.md section 3)."""

from __future__ import annotations

import contextlib
import os

from .models import ctime_now

HERE_IS_OUTPUT = "Here is the output from the autograder:\n---"


def autograder_line(msg: str) -> str:
    """``Autograder [<ctime>]: <msg>`` plus newline, as Tango writes it."""
    return f"Autograder [{ctime_now()}]: {msg}\n"


def temp_path_for(path: str, tag: str) -> str:
    """A hidden file beside ``path`` (same filesystem, so rename is atomic)."""
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.{tag}")


def copy_fd(src: int, dst: int, limit: int | None = None) -> int:
    """Copy from ``src``'s position to ``dst`` (at most ``limit`` bytes) in the
    kernel (sendfile): no Python loop holds the GIL meanwhile, so a thread
    copying 64 MiB does not hold up the event loop. Returns the bytes copied."""
    done = 0
    while limit is None or done < limit:
        n = os.sendfile(dst, src, None, (limit - done) if limit is not None else 1 << 30)
        if n == 0:
            break
        done += n
    return done


def _sync_dir(path: str) -> None:
    """fsync the directory holding ``path``: its new name survives a crash."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_output_atomic(path: str, header: str, body_file: str | None = None) -> None:
    """Write ``header`` then the contents of ``body_file`` to ``path`` atomically.

    The text is written to a hidden file in the same directory, fsynced and
    renamed into place (and the directory fsynced), so a reader sees either
    no file or the whole file, also after a crash.
    """
    tmp = temp_path_for(path, f"{os.getpid()}-{id(header):x}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(header.encode("utf-8", "replace"))
            if body_file is not None:
                try:
                    with open(body_file, "rb") as body:
                        out.flush()
                        copy_fd(body.fileno(), out.fileno())
                except FileNotFoundError:
                    pass
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _sync_dir(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: feedback files up to this size are finished in place (no second file)
INPLACE_LIMIT = 4 * 1024 * 1024


def finish_output(path: str, header: str, feedback: str | None = None) -> None:
    """Put the output file in place: ``header`` then the feedback file's text,
    fsynced (file and directory) before this returns.

    ``feedback`` (a hidden file beside ``path``, as copyOut wrote it) is
    consumed. When it is small enough it is rewritten in place and renamed
    to ``path``: one file created per job, which matters on disks where
    creating a file costs far more than writing it.
    """
    if feedback is not None:
        try:
            f = open(feedback, "r+b")  # noqa: SIM115 - closed below, before the rename
        except FileNotFoundError:
            feedback = None
        else:
            with f:
                small = os.fstat(f.fileno()).st_size <= INPLACE_LIMIT
                if small:
                    body = f.read()
                    f.seek(0)
                    f.write(header.encode("utf-8", "replace"))
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
            if small:
                os.replace(feedback, path)
                _sync_dir(path)
                return
    try:
        write_output_atomic(path, header, feedback)
    finally:
        if feedback is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(feedback)


def output_is_for(path: str, name: str, job_id: int | None) -> bool:
    """Whether the output file at ``path`` is whole and is job ``name:job_id``'s
    (its first line names the job: another job's file of the same name, e.g.
    an earlier grading of the same handin, is not this job's output)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(64 * 1024)
    except OSError:
        return False
    return first.endswith(f": Received job {name}:{job_id}\n".encode("utf-8", "replace"))


def write_failure(path: str, name: str, job_id: int | None, message: str) -> None:
    """A job's output file saying only why it did not run, in Tango's format."""
    write_output_atomic(
        path,
        autograder_line(f"Received job {name}:{job_id}") + autograder_line(message),
    )
