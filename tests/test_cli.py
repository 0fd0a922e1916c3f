"""``vmpool run`` end to end, as a user runs it (the local driver by default)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import autograder_re

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["VMPOOL_LOCAL_DIR"] = str(tmp_path / "state")
    return e


def vmpool(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmpool.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def test_run_hello_on_the_local_driver(env: dict[str, str], tmp_path: Path) -> None:
    p = vmpool(env, "run", str(EXAMPLES / "hello"), "--output-dir", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert re.fullmatch(autograder_re("Received job hello:1"), out[0])
    assert re.fullmatch(autograder_re("Success: Autodriver returned normally"), out[1])
    assert re.fullmatch(autograder_re("Here is the output from the autograder:"), out[2])
    assert out[3:] == [
        "---",
        "Autodriver: Job exited with status 0",
        "Hello from a vmpool job",
        '{"scores": {"hello": 100}}',
    ]
    assert "warming a pool of 1 VM(s) of default on the local driver" in p.stderr
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["hello-1.out"]
    # nothing left behind: no sandbox directory, the owner folder is empty
    state = tmp_path / "state"
    assert all(not any(d.iterdir()) for d in state.iterdir() if d.name != "uids")


def test_c_and_python_graders_score(env: dict[str, str]) -> None:
    p = vmpool(env, "run", str(EXAMPLES / "c-program"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-2:] == ["tests passed: 100/100", '{"scores": {"sum": 100}}']
    p = vmpool(env, "run", str(EXAMPLES / "python-grader"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == '{"scores": {"fib": 100}}'


def test_timeout_example_is_stopped(env: dict[str, str]) -> None:
    p = vmpool(env, "run", str(EXAMPLES / "timeout"), "--timeout", "1")
    assert p.returncode == 1
    out = p.stdout.splitlines()
    assert re.fullmatch(autograder_re("Error: Job timed out after 1 seconds"), out[1])
    assert out[3:5] == ["---", "Autodriver: Job timed out after 1 seconds"]


def test_flood_example_is_capped(env: dict[str, str]) -> None:
    p = vmpool(env, "run", str(EXAMPLES / "flood"), "--max-output", "10000")
    assert p.returncode == 0, p.stderr
    body = p.stdout.split("---\n", 1)[1]
    assert "\n...[excess bytes elided]...\n" in body
    assert len(body) < 10000 + 200
    assert body.endswith("the end\n")


def test_repeat_runs_concurrently_with_progress(env: dict[str, str]) -> None:
    p = vmpool(env, "run", str(EXAMPLES / "hello"), "--driver", "sim", "--repeat", "20",
               "--progress")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("20 jobs in ")
    assert "outcomes: success=20" in p.stdout
    assert "] 20/20 " in p.stderr


def test_bad_input_gets_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    p = vmpool(env, "run", str(tmp_path / "nope"))
    assert p.returncode == 2 and "nope: not a directory" in p.stderr
    (tmp_path / "empty").mkdir()
    p = vmpool(env, "run", str(tmp_path / "empty"))
    assert p.returncode == 2 and "has no Makefile" in p.stderr
    p = vmpool(env, "run", str(EXAMPLES / "hello"), "--driver", "nope")
    assert p.returncode == 2 and "no driver named 'nope'" in p.stderr
    p = vmpool(env, "run", str(EXAMPLES / "hello"), "--image", "nope.img")
    assert p.returncode == 2 and "unknown image 'nope.img'" in p.stderr


def test_a_server_that_cannot_start_says_why_and_exits_1(env: dict[str, str],
                                                         tmp_path: Path) -> None:
    # The port is taken: one line naming it and status 1 (the error was once
    # swallowed at shutdown, and the server exited 0 saying nothing).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "vmpool.toml"
        config.write_text(f'[server]\nport = {port}\nkeys = ["k"]\n'
                          f'courselabs = "{tmp_path / "labs"}"\n'
                          f'database = "{tmp_path / "jobs.sqlite"}"\n'
                          '[vmpool]\ndefault_vmms = "sim"\n')
        p = vmpool(env, "serve", "--config", str(config), timeout=60)
    assert p.returncode == 1, p.stderr
    assert "address already in use" in p.stderr and str(port) in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
