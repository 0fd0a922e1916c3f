"""Tests of the standalone autodriver (autodriver/autodriver.py).

Every test runs the bare program as a subprocess, the way a VM runs it: as
root, with a dedicated grading user (created once per session). Job
directories are fresh directories under /tmp that the grading user can reach.
After every test no process of the grading user may be left (autouse check).
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import random
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import autodriver

from .jobs import DAEMON_PY, ELISION, FORK_BOMB_PY, MEMORY_BOMB_PY, processes_of

AUTODRIVER = Path(__file__).resolve().parent.parent / "autodriver" / "autodriver.py"
GRADER = "vmpool-grader-test"
# The interpreter running the autodriver (AUTODRIVER_PYTHON=python3.8 runs the
# whole file against an old Python).
PYTHON = os.environ.get("AUTODRIVER_PYTHON", sys.executable)
# A python every user can run, for jobs and for running the autodriver as a
# non-root user (the test interpreter may live under root's 0700 home).
PLAIN_PY = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)),
    sys.executable,
)


@dataclass
class Result:
    rc: int
    out: bytes
    err: bytes
    elapsed: float

    @property
    def lines(self) -> list[bytes]:
        return self.out.split(b"\n")


@pytest.fixture(scope="session")
def grader() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        msg = (
            "the autodriver tests must run as root: they create the grading user "
            f"{GRADER} and run jobs as that user"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        return pwd.getpwnam(GRADER)
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", GRADER],
        check=True,
    )
    return pwd.getpwnam(GRADER)


def grader_processes(uid: int) -> list[str]:
    """Live (non-zombie) processes with uid as real, effective or saved uid."""
    return processes_of({uid})


@pytest.fixture(autouse=True)
def no_leftover_processes(grader: pwd.struct_passwd) -> Iterator[None]:
    yield
    assert grader_processes(grader.pw_uid) == []


@pytest.fixture
def make_dir() -> Iterator[Callable[..., Path]]:
    """Factory: a fresh 0755 directory under /tmp holding the given files."""
    made: list[Path] = []

    def make(files: dict[str, str] | None = None, mode: int = 0o755) -> Path:
        d = Path(tempfile.mkdtemp(prefix="vmpool-adtest-"))
        made.append(d)
        for name, text in (files or {}).items():
            (d / name).write_text(text)
        d.chmod(mode)
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def makefile(*recipe: str) -> dict[str, str]:
    return {"Makefile": "all:\n" + "".join(f"\t{line}\n" for line in recipe)}


@functools.cache
def _readable_autodriver() -> Path:
    """A copy of the autodriver any user may read: a run as an unprivileged
    user must not depend on the checkout's own directories being readable
    (a clone in ``mktemp -d`` is owner-only)."""
    d = Path(tempfile.mkdtemp(prefix="vmpool-adtest-prog-"))
    d.chmod(0o755)
    copy = d / "autodriver.py"
    shutil.copyfile(AUTODRIVER, copy)
    copy.chmod(0o644)
    atexit.register(shutil.rmtree, d, True)
    return copy


def run(
    *args: str | Path,
    user: str | None = GRADER,
    timeout: float = 60,
    python: str = PYTHON,
    **kwargs: object,
) -> Result:
    # run as another user (preexec_fn): from a copy that user can read
    program = _readable_autodriver() if "preexec_fn" in kwargs else AUTODRIVER
    cmd = [python, str(program)]
    if user is not None:
        cmd += ["--user", user]
    cmd += [str(a) for a in args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


# --------------------------------------------------------------------------
# Basics


def test_hello(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo hello"))
    r = run(d)
    assert r.rc == 0, r
    assert r.out == b"Autodriver: Job exited with status 0\nhello\n"


@pytest.mark.parametrize(
    "opts",
    [
        ["-u", "100", "-f", "104857600", "-t", "10", "-o", "1024000"],
        ["--nproc=100", "--fsize", "104857600", "--timeout=10", "--osize", "1024000"],
        ["-u100", "-f104857600", "-t10", "-o1024000"],
    ],
)
def test_tango_command_line(make_dir: Callable[..., Path], opts: list[str]) -> None:
    d = make_dir(makefile("@echo hello"))
    r = run(*opts, d)
    assert (r.rc, r.out) == (0, b"Autodriver: Job exited with status 0\nhello\n")


def test_failing_make(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo boom; exit 1"))
    r = run(d)
    assert r.rc == 0
    assert r.lines[0] == b"Autodriver: Job exited with status 2"
    assert r.lines[1] == b"boom"
    assert b"make: *** [Makefile:2: all] Error 1" in r.out


def test_stderr_is_merged(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo one; echo two >&2; echo three"))
    r = run(d)
    assert r.out == b"Autodriver: Job exited with status 0\none\ntwo\nthree\n"


def test_make_killed_by_signal(make_dir: Callable[..., Path]) -> None:
    # The recipe's shell kills its parent, make, with SIGKILL.
    d = make_dir(makefile("@kill -KILL $$PPID"))
    r = run(d)
    assert r.rc == 0
    assert r.lines[:2] == [
        b"Autodriver: Job exited with status 137",
        b"Autodriver: make was killed by signal 9 (SIGKILL)",
    ]


def test_runs_as_grading_user(make_dir: Callable[..., Path], grader: pwd.struct_passwd) -> None:
    d = make_dir(
        makefile("@id -u; id -g; id -G; echo $$USER; touch made-by-job; stat -c %U made-by-job")
    )
    r = run(d)
    uid, gid = str(grader.pw_uid).encode(), str(grader.pw_gid).encode()
    # supplementary groups dropped: id -G shows the primary group only
    assert r.lines[1:6] == [uid, gid, gid, GRADER.encode(), GRADER.encode()], r.out
    assert uid != b"0"


def test_the_job_gets_a_short_environment_never_the_callers(
    make_dir: Callable[..., Path],
) -> None:
    d = make_dir(makefile("@env | sort"))
    r = run("--env", "JAVA_HOME=/opt/jdk", "--env=EMPTY=", d,
            env={**os.environ, "RESTFUL_KEY": "k3y", "AWS_SECRET_ACCESS_KEY": "s3cret",
                 "LANG": "de_DE.UTF-8"})
    assert r.rc == 0, r.out
    names = {line.split(b"=", 1)[0].decode() for line in r.lines[1:] if line}
    # make adds its own MAKEFLAGS, MAKELEVEL and MFLAGS for its children
    assert names == {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "PWD",
                     "JAVA_HOME", "EMPTY", "MAKEFLAGS", "MAKELEVEL", "MFLAGS"}, r.out
    assert b"TERM=dumb" in r.lines and b"LANG=C.UTF-8" in r.lines
    assert b"JAVA_HOME=/opt/jdk" in r.lines and b"k3y" not in r.out and b"s3cret" not in r.out


def test_nonexistent_make_is_an_os_error(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo hello"))
    r = run(d, env={**os.environ, "PATH": "/nonexistent"})
    assert r.rc == 3
    assert r.out == b"Autodriver: Error executing make: No such file or directory\n"


def test_python38_compatible(make_dir: Callable[..., Path]) -> None:
    """The program must run on the oldest Python grading images carry (3.8)."""
    candidates = [
        *Path("/root/.pyenv/versions").glob("3.8*/bin/python3.8"),
        shutil.which("python3.8"),
    ]
    py38 = next(
        (str(p) for p in candidates if p and "/shims/" not in str(p) and os.access(p, os.X_OK)),
        None,
    )
    if py38 is None:
        # No 3.8 interpreter here: at least its grammar (3.8-only syntax).
        ast.parse(AUTODRIVER.read_text(), feature_version=(3, 8))
        return
    d = make_dir(makefile("@echo hello"))
    r = run("-t", "10", "-o", "100", d, python=py38)
    assert (r.rc, r.out) == (0, b"Autodriver: Job exited with status 0\nhello\n"), r.err


# --------------------------------------------------------------------------
# Usage errors: exit 1 and one "Autodriver: ..." line


def test_refuses_root_as_grading_user(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo hello"))
    r = run(d, user="root")
    assert r.rc == 1
    assert r.out == b"Autodriver: refusing to run the job as root (user root has uid 0)\n"
    assert (d / "Makefile").stat().st_uid == 0  # nothing was touched


def test_missing_grading_user(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo hello"))
    r = run(d, user="vmpool-no-such-user")
    assert r.rc == 1
    assert r.out == b"Autodriver: grading user vmpool-no-such-user does not exist\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: DIRECTORY"),
        (["/nonexistent/vmpool-job"], "/nonexistent/vmpool-job: not a directory"),
        (["-x", "DIR"], "unrecognized arguments: -x"),
        (["-t", "soon", "DIR"], "argument -t/--timeout: invalid time 'soon'"),
        (["--nproc=-5", "DIR"], "argument -u/--nproc: invalid number '-5': must not be negative"),
        (["-o", "10Q", "DIR"], "argument -o/--osize: invalid size '10Q'"),
        (["DIR", "OTHER"], "unrecognized arguments: OTHER"),
        (["/"], "refusing to use / as the job directory"),
        (["/tmp"], "refusing to use /tmp as the job directory"),
    ],
)
def test_usage_errors(make_dir: Callable[..., Path], args: list[str], message: str) -> None:
    d = make_dir(makefile("@echo hello"))
    r = run(*[str(d) if a == "DIR" else a for a in args])
    assert r.rc == 1
    assert r.out == f"Autodriver: {message}\n".encode()


def _as_user(uid: int, gid: int) -> Callable[[], None]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return drop


def test_other_unprivileged_user_is_refused(make_dir: Callable[..., Path]) -> None:
    nobody = pwd.getpwnam("nobody")
    d = make_dir(makefile("@echo hello"))
    r = run(d, python=PLAIN_PY, preexec_fn=_as_user(nobody.pw_uid, nobody.pw_gid))
    assert r.rc == 1
    assert (
        r.out
        == (
            f"Autodriver: must run as root or as the grading user {GRADER}"
            f" (running as uid {nobody.pw_uid})\n"
        ).encode()
    )


def test_runs_as_the_grading_user_itself(
    make_dir: Callable[..., Path], grader: pwd.struct_passwd
) -> None:
    """Without root, as the grading user: runs without switching, deletes nothing,
    and still kills what the job left behind (tracked as descendants)."""
    d = make_dir(makefile("@id -u", "@setsid sleep 1000 &", "@touch /tmp/$(TOKEN)"))
    os.chown(d, grader.pw_uid, grader.pw_gid)
    token = f"vmpool-adtest-{uuid.uuid4().hex}"
    leftover = Path("/tmp") / token
    try:
        r = run(
            "-t",
            "20",
            d,
            f"--output={d}/feedback",
            f"--env=TOKEN={token}",
            python=PLAIN_PY,
            preexec_fn=_as_user(grader.pw_uid, grader.pw_gid),
        )
        assert r.rc == 0, r
        feedback = (d / "feedback").read_bytes()
        assert feedback == f"Autodriver: Job exited with status 0\n{grader.pw_uid}\n".encode()
        assert (d / "Makefile").exists() and leftover.exists()  # nothing deleted
        assert r.elapsed < 10
    finally:
        leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# Timeouts and killing every process of the job


def test_timeout_infinite_loop(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo start; while :; do :; done"))
    r = run("-t", "1", d)
    assert r.rc == 2
    assert r.lines[:2] == [b"Autodriver: Job timed out after 1 seconds", b"start"]
    assert r.elapsed < 1 + 2, r.elapsed


def test_timeout_fraction_is_printed(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@sleep 100"))
    r = run("-t", "0.5", d)
    assert (r.rc, r.lines[0]) == (2, b"Autodriver: Job timed out after 0.5 seconds")


def test_job_ignoring_sigterm_is_killed(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@trap '' TERM HUP INT; while :; do :; done"))
    r = run("-t", "1", d)
    assert (r.rc, r.lines[0]) == (2, b"Autodriver: Job timed out after 1 seconds")
    assert r.elapsed < 3




@pytest.mark.parametrize("finish", ["normal", "timeout"])
def test_setsid_and_daemons_are_killed(
    make_dir: Callable[..., Path], grader: pwd.struct_passwd, finish: str
) -> None:
    recipe = [
        "@setsid sleep 1000 &",  # keeps the output pipe open
        "@setsid sleep 1001 </dev/null >/dev/null 2>&1 &",
        f"@{PLAIN_PY} daemon.py",  # double fork + setsid, keeps the pipe
        "@nohup sleep 1002 >/dev/null 2>&1 &",
        "@echo recipe done",
    ]
    if finish == "timeout":
        recipe.append("@sleep 1000")
    d = make_dir({**makefile(*recipe), "daemon.py": DAEMON_PY})
    r = run("-t", "2", d)
    assert b"daemon up" in r.out and b"recipe done" in r.out
    if finish == "normal":
        assert (r.rc, r.lines[0]) == (0, b"Autodriver: Job exited with status 0")
        assert r.elapsed < 2  # did not wait for the sleepers, nor for the timeout
    else:
        assert (r.rc, r.lines[0]) == (2, b"Autodriver: Job timed out after 2 seconds")
        assert r.elapsed < 2 + 2
    assert grader_processes(grader.pw_uid) == []




def test_fork_bomb(make_dir: Callable[..., Path], grader: pwd.struct_passwd) -> None:
    d = make_dir({**makefile(f"@{PLAIN_PY} bomb.py"), "bomb.py": FORK_BOMB_PY})
    cmd = [PYTHON, str(AUTODRIVER), "--user", GRADER, "-u", "50", "-t", "3", str(d)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    counts, latencies = [], []
    try:
        while proc.poll() is None and time.monotonic() - start < 20:
            counts.append(len(grader_processes(grader.pw_uid)))
            t = time.monotonic()
            subprocess.run(["true"], check=True, timeout=10)  # is the machine responsive?
            latencies.append(time.monotonic() - t)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    elapsed = time.monotonic() - start
    print(
        f"fork bomb: {elapsed:.2f}s, max {max(counts)} grader processes, "
        f"worst latency {max(latencies) * 1000:.0f} ms"
    )
    assert proc.returncode == 2
    assert out.split(b"\n")[:2] == [b"Autodriver: Job timed out after 3 seconds", b"bombing"]
    assert elapsed < 3 + 3
    assert max(counts) <= 50 + 1  # RLIMIT_NPROC (+ the autodriver's kill helper)
    assert max(latencies) < 2
    assert grader_processes(grader.pw_uid) == []


def test_autodriver_sigterm_kills_the_job(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo started", "@echo ready > fifo; sleep 1000"))
    os.mkfifo(d / "fifo", 0o644)
    cmd = [PYTHON, str(AUTODRIVER), "--user", GRADER, "-t", "60", str(d)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fd = os.open(d / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        try:
            ready, _, _ = select.select([fd], [], [], 20)  # the job is running
            assert ready and os.read(fd, 100) == b"ready\n"
        finally:
            os.close(fd)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 3
    assert out == b"Autodriver: Job interrupted: autodriver received SIGTERM\nstarted\n"


def test_cpu_limit(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@while :; do :; done"))
    r = run("--cpu", "1", "-t", "20", d)
    assert (r.rc, r.lines[0]) == (0, b"Autodriver: Job exited with status 2")
    assert b"CPU time limit exceeded" in r.out
    assert r.elapsed < 10


# --------------------------------------------------------------------------
# Output


def test_output_flood_is_capped_while_produced(make_dir: Callable[..., Path]) -> None:
    """1 GB on stdout with -o 1024000: finishes fast, bounded memory, Tango's format."""
    d = make_dir(makefile("@head -c 1000000000 /dev/zero | tr '\\0' a", "@echo", "@echo LAST-LINE"))
    # Run the autodriver under a wrapper reporting the peak RSS of it and its
    # descendants (RUSAGE_CHILDREN): the autodriver must not hold the stream.
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:])\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "sys.stderr.write('MAXRSS_KB=%d\\n' % peak)\n"
        "sys.exit(r.returncode)\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            wrapper,
            PYTHON,
            str(AUTODRIVER),
            "--user",
            GRADER,
            "-t",
            "120",
            "-o",
            "1024000",
            str(d),
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - start
    match = re.search(rb"MAXRSS_KB=(\d+)", proc.stderr)
    assert match, proc.stderr
    peak_mb = int(match.group(1)) / 1024
    print(f"1 GB flood: {elapsed:.2f}s, peak RSS {peak_mb:.1f} MB, {len(proc.stdout)} bytes out")
    assert proc.returncode == 0
    status = b"Autodriver: Job exited with status 0\n"
    tail = b"a" * (512000 - len(b"\nLAST-LINE\n")) + b"\nLAST-LINE\n"
    assert proc.stdout == status + b"a" * 512000 + ELISION + tail
    assert len(proc.stdout) <= 1024000 + 100
    assert peak_mb < 100
    assert elapsed < 60


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"0123456789ABCDEFGHIJ\n", b"01234" + ELISION + b"GHIJ\n"),  # 21 bytes > 10
        (b"012345678\n", b"012345678\n"),  # exactly the cap: kept whole
        (b"", b""),
    ],
)
def test_output_cap_format(make_dir: Callable[..., Path], text: bytes, expected: bytes) -> None:
    d = make_dir({**makefile("@cat out.txt"), "out.txt": text.decode()})
    r = run("-o", "10", d)
    assert r.out == b"Autodriver: Job exited with status 0\n" + expected


def test_unlimited_output(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@head -c 20000000 /dev/zero | tr '\\0' b"))
    r = run("-o", "0", d)
    status = b"Autodriver: Job exited with status 0\n"
    assert r.out[: len(status)] == status
    assert len(r.out) == len(status) + 20_000_000
    assert r.out[len(status) :] == b"b" * 20_000_000


def test_output_file_option(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("@echo hello"))
    feedback = d / "feedback.txt"  # inside the job directory: must survive cleanup
    r = run("--output", feedback, d)
    assert (r.rc, r.out) == (0, b"")
    assert feedback.read_bytes() == b"Autodriver: Job exited with status 0\nhello\n"
    assert feedback.stat().st_uid == 0  # never handed to the grading user


def test_output_file_cannot_be_forged_by_the_job(make_dir: Callable[..., Path]) -> None:
    """The job owns its directory: it may delete, rename or replace the feedback
    file in it; the autodriver still delivers the real feedback at that path."""
    d = make_dir(
        makefile(
            "@mv feedback.txt moved.txt",
            "@ln -s /etc/vmpool-adtest-forged feedback.txt",
            "@(echo forged > moved.txt) 2>/dev/null || echo cannot write it",
        )
    )
    feedback = d / "feedback.txt"
    r = run("--output", feedback, d)
    assert r.rc == 0
    assert not feedback.is_symlink()
    assert feedback.read_bytes() == b"Autodriver: Job exited with status 0\ncannot write it\n"
    assert not Path("/etc/vmpool-adtest-forged").exists()


def test_inherited_descriptors_are_closed(make_dir: Callable[..., Path]) -> None:
    secret = make_dir({"secret.txt": "inherited-secret\n"}, mode=0o700) / "secret.txt"
    fd = os.open(secret, os.O_RDONLY)
    try:
        d = make_dir(makefile(f"-{PLAIN_PY} -c 'import os; print(os.read({fd}, 100))'"))
        r = run(d, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert b"inherited-secret" not in r.out
    assert b"Bad file descriptor" in r.out


# --------------------------------------------------------------------------
# Limits




@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup-if-available", "rlimit-only"])
def test_memory_bomb(make_dir: Callable[..., Path], cgroup: bool) -> None:
    d = make_dir({**makefile(f"@{PLAIN_PY} bomb.py"), "bomb.py": MEMORY_BOMB_PY})
    r = run("--mem", "100MB", "-t", "30", *([] if cgroup else ["--no-cgroup"]), d)
    assert r.rc == 0, r
    assert r.lines[:2] == [
        b"Autodriver: Job exited with status 2",
        b"Autodriver: memory limit of 100000000 bytes exceeded",
    ]
    assert r.elapsed < 20


def test_memory_limit_leaves_normal_jobs_alone(make_dir: Callable[..., Path]) -> None:
    # Uses some memory, and merely mentions an allocation failure: no accusation.
    d = make_dir(
        makefile(f"@{PLAIN_PY} -c 'x = b\"y\" * 10**7; print(len(x))'", "@echo MemoryError")
    )
    r = run("--mem", "200MB", "-t", "30", d)
    assert r.out == b"Autodriver: Job exited with status 0\n10000000\nMemoryError\n"


def test_file_size_limit(make_dir: Callable[..., Path]) -> None:
    d = make_dir(makefile("-dd if=/dev/zero of=big bs=1M count=5", "@stat -c size=%s big"))
    r = run("-f", "1000000", d)
    assert r.rc == 0
    assert b"File size limit exceeded" in r.out
    size = re.search(rb"size=(\d+)", r.out)
    assert size and int(size.group(1)) <= 1_000_000, r.out


def test_cannot_read_another_jobs_directory(make_dir: Callable[..., Path]) -> None:
    other = make_dir({"secret.txt": "the-answer-key\n"}, mode=0o700)  # root's, 0700
    d = make_dir(makefile(f"-cat {other}/secret.txt", f"-ls {other}"))
    r = run(d)
    assert r.lines[0] == b"Autodriver: Job exited with status 0"
    assert r.out.count(b"Permission denied") == 2
    assert b"the-answer-key" not in r.out


# --------------------------------------------------------------------------
# Cleanup


def test_cleanup_removes_the_grading_users_files(
    make_dir: Callable[..., Path], grader: pwd.struct_passwd
) -> None:
    token = f"vmpool-adtest-{uuid.uuid4().hex}"
    outside = make_dir({"target.txt": "root's file\n", "linked.txt": "linked\n"})
    d = make_dir(
        makefile(
            f"@echo x > /tmp/{token}.txt",
            f"@mkdir -p /var/tmp/{token}/sub && touch /var/tmp/{token}/sub/f",
            f"@echo x > /dev/shm/{token}",
            "@mkdir -p sub/deeper && echo x > sub/deeper/f",
            f"@ln -s /etc/passwd /tmp/{token}-link",
            "@ln -s /etc etc-link",
            "@echo done",
        )
    )
    # Planted before the job: a symlink and a hard link to root's files outside.
    (d / "planted-link").symlink_to(outside / "target.txt")
    os.link(outside / "linked.txt", d / "hardlink.txt")
    keep = Path("/tmp") / f"{token}-root.txt"  # root's file in /tmp: stays
    keep.write_text("keep\n")
    passwd_before = Path("/etc/passwd").stat()
    try:
        r = run(d)
        assert (r.rc, r.lines[:2]) == (0, [b"Autodriver: Job exited with status 0", b"done"])
        for gone in (
            f"/tmp/{token}.txt",
            f"/var/tmp/{token}",
            f"/dev/shm/{token}",
            f"/tmp/{token}-link",
        ):
            assert not os.path.lexists(gone), gone
        assert sorted(p.name for p in d.iterdir()) == ["hardlink.txt"]  # root's, kept
        assert d.is_dir() and d.stat().st_uid == grader.pw_uid
        assert keep.read_text() == "keep\n"
        for f in ("target.txt", "linked.txt"):
            assert (outside / f).stat().st_uid == 0, f  # links were not followed
        assert Path("/etc/passwd").stat() == passwd_before
        assert Path("/etc").is_dir()
    finally:
        keep.unlink(missing_ok=True)
        for leftover in (Path(f"/tmp/{token}.txt"), Path(f"/dev/shm/{token}")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(f"/var/tmp/{token}", ignore_errors=True)


def test_no_cleanup_keeps_files(make_dir: Callable[..., Path], grader: pwd.struct_passwd) -> None:
    d = make_dir(makefile("@echo result > result.txt"))
    r = run("--no-cleanup", d)
    assert r.rc == 0
    assert (d / "result.txt").read_text() == "result\n"
    assert (d / "Makefile").stat().st_uid == grader.pw_uid
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


# --------------------------------------------------------------------------
# Pieces of the program, in-process


def _load_autodriver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmpool_autodriver_under_test", AUTODRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit", [1, 2, 3, 10, 11, 1000])
def test_capture_keeps_head_and_tail(limit: int) -> None:
    ad = _load_autodriver()
    rng = random.Random(limit)
    for total in (0, limit - 1, limit, limit + 1, 3 * limit, 50 * limit + 7):
        data = bytes(rng.randrange(256) for _ in range(max(total, 0)))
        cap = ad.Capture(limit)
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 2, 5, limit, 2 * limit + 3])
            cap.feed(data[pos : pos + step])
            pos += step
        half = limit // 2
        if len(data) <= limit:
            expected = data
        else:
            expected = data[:half] + ELISION + (data[len(data) - half :] if half else b"")
        assert b"".join(cap.chunks()) == expected, (limit, total)
        assert len(cap.head) <= limit and len(cap.tail) <= half


def test_gives_up_on_processes_that_cannot_be_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    ad = _load_autodriver()
    drv = ad.Autodriver(ad.build_parser().parse_args(["/nonexistent"]))
    drv.make_status = 0
    unkillable = ad.Proc(2**22 + 1, 1, "D", (12345, 12345, 12345))
    monkeypatch.setattr(ad, "KILL_SECONDS", 0.05)
    monkeypatch.setattr(drv, "job_processes", lambda: [unkillable])
    monkeypatch.setattr(drv, "_kill_pids", lambda procs: None)
    monkeypatch.setattr(drv, "reap", lambda: None)
    assert drv.kill_job() is False
    assert drv.status_lines(ad.Capture(10), False) == [
        "Job exited with status 0",
        "Gave up killing user processes",
    ]


# The drivers' command line (autodriver.arguments)


def test_arguments_are_what_the_autodriver_parses() -> None:
    """Every option the helper can give, read back by the autodriver's own
    parser (argparse) and by its fast path, which agree."""
    ad = _load_autodriver()
    args = autodriver.arguments(
        timeout=2.5, max_output=1024000, nproc=100, fsize=104857600, job_dir="/job dir",
        memory=1 << 30, cpu_seconds=7, user="#61000", output="/out/feedback",
        partial="/out/partial", env={"JAVA_HOME": "/opt/jdk", "EMPTY": "", "X": "a=b c"},
        quota=True, seccomp=False, cgroup=False,
    )
    assert args[:8] == ["-u", "100", "-f", "104857600", "-t", "2.5", "-o", "1024000"]
    assert args[-1] == "/job dir"
    parsed = vars(ad.build_parser().parse_args(args))
    assert parsed == {
        "nproc": 100, "fsize": 104857600, "timeout": 2.5, "osize": 1024000,
        "mem": 1 << 30, "cpu": 7, "user": "#61000", "output": "/out/feedback",
        "partial": "/out/partial", "env": ["EMPTY=", "JAVA_HOME=/opt/jdk", "X=a=b c"],
        "quota": True, "no_seccomp": True, "no_cleanup": False, "no_cgroup": True,
        "directory": "/job dir",
    }
    assert vars(ad.quick_parse(args)) == parsed
    # the defaults leave every vmpool option out
    plain = autodriver.arguments(timeout=10, max_output=0, nproc=0, fsize=0, job_dir="/j")
    assert plain == ["-u", "0", "-f", "0", "-t", "10", "-o", "0", "/j"]
    assert vars(ad.quick_parse(plain)) == vars(ad.build_parser().parse_args(plain))


def test_arguments_in_tangos_form() -> None:
    ad = _load_autodriver()
    args = autodriver.arguments(timeout=10, max_output=1024000, nproc=100, fsize=104857600,
                                job_dir="/home/autograde/autolab", tango_only=True)
    # what Tango's own autodriver is given, and nothing else
    assert args == ["-u", "100", "-f", "104857600", "-t", "10", "-o", "1024000",
                    "/home/autograde/autolab"]
    assert ad.build_parser().parse_args(args).timeout == 10
    with pytest.raises(ValueError, match="--mem"):
        autodriver.arguments(timeout=1, max_output=0, nproc=0, fsize=0, job_dir="/j",
                             memory=1, tango_only=True)


@pytest.mark.parametrize("env", [{"": "x"}, {"A=B": "x"}, {"A": "x\x00y"}])
def test_arguments_refuse_a_bad_environment(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="bad environment variable"):
        autodriver.arguments(timeout=1, max_output=0, nproc=0, fsize=0, job_dir="/j", env=env)
