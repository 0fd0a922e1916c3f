"""``vmpool serve`` killed with SIGKILL half-way through 200 jobs, then restarted.

The server runs as a subprocess (``python -m vmpool.cli serve --config``) on
the local driver, with its own state directory, courselabs folder, database
and sandbox uids (63500..63539, apart from the other test modules'). After
the kill a second server with the same configuration must finish every job
exactly once: each output file complete and written once, the outputs that
existed at the kill left untouched, every other job run again, job ids never
given twice, every callback delivered at least once, and, once the second
server is stopped with SIGTERM, nothing left behind (no sandbox directory,
uid claim, cgroup or process).

The only sleeps are the bounded filesystem polls marked ``# ok-sleep``: the
test waits for output files written by another process.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

from vmpool.server.store import SQLiteStore
from vmpool_drivers.local import LocalVMMS

from .conftest import autograder_re
from .jobs import CallbackReceiver

ROOT = Path(__file__).resolve().parents[1]
UID_BASE = 63500
UIDS = 40
N_JOBS = 200
KILL_AFTER = 30  # outputs present when the first server is killed
KEY = "crashkey"
LAB = "crashlab"
SERVING = re.compile(r"serving .* on http://127\.0\.0\.1:(\d+)/")
POLL = 0.05


# --------------------------------------------------------------------------
# Helpers


class Server:
    """One ``vmpool serve`` process; a thread drains its stderr into a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("VMPOOL_") and k != "RESTFUL_KEY"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmpool.cli", "serve", "--config", str(config)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self._port: queue.Queue[int | None] = queue.Queue()
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._drain, args=(self.proc.stderr,),
                                        daemon=True)
        self._reader.start()

    def _drain(self, stream: IO[str]) -> None:
        with open(self.log, "a") as out:
            for line in stream:
                out.write(line)
                out.flush()
                m = SERVING.search(line)
                if m:
                    self._port.put(int(m.group(1)))
        self._port.put(None)

    def wait_ready(self, limit: float = 60) -> int:
        """The port, once the server says it is serving (recovery done)."""
        try:
            port = self._port.get(timeout=limit)
        except queue.Empty:
            pytest.fail(f"no 'serving' line within {limit} s:\n{self.log.read_text()}")
        if port is None:
            pytest.fail(f"the server exited before serving:\n{self.log.read_text()}")
        return port

    def stop(self, sig: signal.Signals, limit: float = 60) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the server did not exit within {limit} s of {sig.name}")
        self._reader.join(timeout=10)
        return code

    def kill_if_running(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


def processes(uids: set[int], marker: str) -> list[str]:
    """Live processes with one of ``uids``, or whose command line names ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ids = {int(v) for v in fields.get("Uid", "").split()[:3]}
        if fields.get("State", "?").strip()[:1] in ("Z", "X"):
            continue
        if ids & uids or marker in cmdline:
            found.append(f"{name} uids={sorted(ids)} {cmdline[:200]}")
    return found


class Crash:
    """The test's owner, folders and uid range, and what it may leave behind."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.owner = f"crash{os.getpid()}"
        self.state = tmp / "state"
        self.labs = tmp / "labs"
        self.db = tmp / "jobs.sqlite"
        self.outdir = self.labs / f"{KEY}-{LAB}" / "output"
        self.uids = set(range(UID_BASE, UID_BASE + UIDS))
        self.config = tmp / "vmpool.toml"

    def write_config(self) -> None:
        q = json.dumps  # a JSON string is a TOML basic string
        self.config.write_text(
            "[server]\n"
            'host = "127.0.0.1"\n'
            "port = 0\n"
            f"keys = [{q(KEY)}]\n"
            f"courselabs = {q(str(self.labs))}\n"
            f"database = {q(str(self.db))}\n"
            "callback_backoff = 0.1\n"
            "callback_tries = 5\n"
            "\n[vmpool]\n"
            'default_vmms = "local"\n'
            "pool_size = 4\n"
            "backoff_initial = 0.05\n"
            "backoff_max = 1.0\n"
            "\n[drivers.local]\n"
            f"state_dir = {q(str(self.state))}\n"
            f"uid_base = {UID_BASE}\n"
            f"uid_count = {UIDS}\n"
            f"owner = {q(self.owner)}\n"
        )

    def outputs(self) -> set[str]:
        if not self.outdir.is_dir():
            return set()
        return {p.name for p in self.outdir.iterdir() if not p.name.startswith(".")}

    def wait_outputs(self, predicate: Any, limit: float, what: str) -> set[str]:
        """Poll the output folder (written by another process) until ``predicate``."""
        deadline = time.monotonic() + limit
        while not predicate(found := self.outputs()):
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {limit} s ({len(found)} outputs)")
            time.sleep(POLL)  # ok-sleep: bounded poll of files another process writes
        return found

    def sandboxes(self) -> list[Path]:
        d = self.state / self.owner
        return sorted(d.iterdir()) if d.is_dir() else []

    def claims(self) -> list[str]:
        """Claimed uids of the range, with the sandbox each names."""
        found = []
        for u in sorted(self.uids):
            p = Path("/run/vmpool/uids") / str(u)
            if p.exists():
                try:
                    who = (p / "owner").read_text().strip()
                except OSError:
                    who = "?"
                found.append(f"{p} ({who})")
        return found

    def cgroups(self) -> list[str]:
        found: list[str] = []
        for ctrl in ("pids", "memory", ""):
            parent = Path("/sys/fs/cgroup") / ctrl / "vmpool"
            if parent.is_dir():
                found.extend(str(p) for p in parent.glob(f"vmpool-{self.owner}-*"))
        return found

    def leftovers(self) -> dict[str, list[str]]:
        left = {
            "processes": processes(self.uids, str(self.state)),
            "uid claims": self.claims(),
            "cgroups": self.cgroups(),
            "sandboxes": [str(p) for p in self.sandboxes()],
        }
        return {k: v for k, v in left.items() if v}

    def clean(self) -> None:
        """Remove what a failed run left, so that it does not leak into the next."""
        if (self.state / self.owner).is_dir():
            drv = LocalVMMS(owner=self.owner, state_dir=str(self.state), uid_base=UID_BASE,
                            uid_count=UIDS)

            async def destroy_all() -> None:
                for vm in await drv.getVMs():
                    with contextlib.suppress(Exception):
                        await drv.destroyVM(vm)

            anyio.run(destroy_all)
        for cg in self.cgroups():
            with contextlib.suppress(OSError):
                Path(cg).rmdir()
        # the driver cannot find the claim of a sandbox that lost its vm.json
        for u in self.uids:
            claim = Path("/run/vmpool/uids") / str(u)
            with contextlib.suppress(OSError):
                if (claim / "owner").read_text().startswith(f"{self.owner}/"):
                    shutil.rmtree(claim)


def makefile(i: int) -> str:
    return f"all:\n\t@echo start-job{i}\n\t@sleep 0.2\n\t@echo done-job{i}\n"


# --------------------------------------------------------------------------
# The test


@pytest.mark.timeout(200)
def test_sigkill_mid_run_then_restart_runs_every_job_exactly_once(tmp_path: Path) -> None:
    env = Crash(tmp_path)
    env.write_config()
    before = env.leftovers()
    # what a killed earlier run left in this uid range is not ours to judge,
    # but it must leave room for this run's sandboxes
    assert len(before.get("uid claims", [])) < UIDS - 8, before
    servers: list[Server] = []
    callbacks = CallbackReceiver()
    cb_url = f"http://127.0.0.1:{callbacks.port}/done"
    t0 = time.monotonic()
    try:
        # ---- first server: accept all 200 jobs, kill it part-way through
        a = Server(env.config, tmp_path / "server-a.log")
        servers.append(a)
        port = a.wait_ready()
        assert call(port, "GET", f"/open/{KEY}/{LAB}/")["statusMsg"] == "Created directory"
        for i in range(N_JOBS):
            r = call(port, "POST", f"/upload/{KEY}/{LAB}/", makefile(i).encode(),
                     {"Filename": f"Makefile-job{i}"})
            assert r["statusMsg"] == "Uploaded file", r
        ids: dict[int, int] = {}
        for i in range(N_JOBS):
            job = {
                "image": "default",
                "jobName": f"job{i}",
                "output_file": f"job{i}.out",
                "files": [{"localFile": f"Makefile-job{i}", "destFile": "Makefile"}],
                "timeout": 30,
                "callback_url": cb_url,
            }
            r = call(port, "POST", f"/addJob/{KEY}/{LAB}/", json.dumps(job).encode())
            assert r["statusId"] == 0 and r["statusMsg"] == "Job added", r
            assert isinstance(r["jobId"], str)
            ids[i] = int(r["jobId"])
        assert sorted(ids.values()) == list(range(1, N_JOBS + 1))  # a fresh store

        env.wait_outputs(lambda found: len(found) >= KILL_AFTER, 90, f"{KILL_AFTER} outputs")
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        t_kill = time.monotonic() - t0

        # what the first server finished: it must not be touched again
        done_at_kill = env.outputs()
        assert KILL_AFTER <= len(done_at_kill) < N_JOBS, "all jobs done before the kill"
        snapshot = {}
        for name in done_at_kill:
            p = env.outdir / name
            snapshot[name] = (p.stat().st_ino, p.read_bytes())
        orphans = env.sandboxes()
        orphans_meta = {(p, (p / "vm.json").exists()) for p in orphans}
        assert orphans, "the killed server left no sandbox (nothing to reconcile)"

        # ---- second server: same configuration
        b = Server(env.config, tmp_path / "server-b.log")
        servers.append(b)
        port = b.wait_ready()
        # ready means recovered: the killed server's sandboxes are gone, and
        # so is every process that ran in them
        left = [f"{p.name} (had vm.json: {(p, True) in orphans_meta})"
                for p in orphans if p.exists()]
        assert left == [], "sandboxes of the killed server still there after the restart"
        assert [p for o in orphans for p in processes(set(), str(o))] == []

        # a job accepted after the restart gets an id never given before
        late = {
            "image": "default",
            "jobName": "late",
            "output_file": "late.out",
            "files": [{"localFile": "Makefile-job0", "destFile": "Makefile"}],
            "timeout": 30,
            "callback_url": cb_url,
        }
        r = call(port, "POST", f"/addJob/{KEY}/{LAB}/", json.dumps(late).encode())
        assert r["statusMsg"] == "Job added", r
        late_id = int(r["jobId"])
        assert late_id > max(ids.values())

        expected = {f"job{i}.out" for i in range(N_JOBS)} | {"late.out"}
        env.wait_outputs(lambda found: found >= expected, 100, "all outputs after the restart")
        t_all = time.monotonic() - t0

        # every callback arrives at least once (those pending at the kill
        # are sent again by the second server)
        got = callbacks.wait_for(expected, 30)
        assert set(got) == expected, f"no callback for {sorted(expected - set(got))[:10]}"
        # while the second server is up: it still answers, and has no live job
        live = call(port, "GET", f"/jobs/{KEY}/0/")
        assert live["jobs"] == []

        assert b.stop(signal.SIGTERM) == 0
        t_stop = time.monotonic() - t0

        # ---- every job ran to completion, exactly once
        final = sorted(p.name for p in env.outdir.iterdir())
        assert [n for n in final if n.startswith(".")] == [], "temporary files left"
        assert set(final) == expected and len(final) == N_JOBS + 1
        retried = sum(
            check_output(env.outdir / f"job{i}.out", f"job{i}", ids[i], f"job{i}") > 0
            for i in range(N_JOBS)
        )
        check_output(env.outdir / "late.out", "late", late_id, "job0")
        for name, (ino, data) in snapshot.items():
            p = env.outdir / name
            assert (p.stat().st_ino, p.read_bytes()) == (ino, data), (
                f"{name} was finished before the kill and written again after it"
            )

        # ---- the store: every job done once, the unfinished ones run again
        store = SQLiteStore(env.db)
        try:
            assert store.count() == {"done": N_JOBS + 1}
            rows = {s.id: s for s in store.done(limit=10 * N_JOBS)}
        finally:
            store.close()
        assert sorted(rows) == sorted([*ids.values(), late_id])
        for i, job_id in ids.items():
            s = rows[job_id]
            name = f"job{i}.out"
            requeued = any("requeued after a restart" in t for t in s.job.trace)
            assert s.outcome in ("success", "recovered"), (name, s.outcome, s.message)
            if name in done_at_kill:
                assert not requeued, f"{name} was done at the kill but ran again"
            else:
                assert requeued and s.outcome == "success", (name, s.outcome, s.job.trace)
            assert s.outcome != "recovered" or name in done_at_kill
        assert rows[late_id].outcome == "success"

        # ---- nothing left behind
        left = {k: sorted(set(v) - set(before.get(k, [])))
                for k, v in env.leftovers().items()}
        assert {k: v for k, v in left.items() if v} == {}
        assert not (env.state / env.owner).exists() or env.sandboxes() == []
        print(f"\nkilled at {t_kill:.1f} s with {len(done_at_kill)}/{N_JOBS} outputs; "
              f"all done at {t_all:.1f} s; stopped at {t_stop:.1f} s; "
              f"callbacks {sum(got.values())} for {len(got)} jobs "
              f"({sum(1 for n in got.values() if n > 1)} sent twice); "
              f"{retried} jobs retried after a system error")
    finally:
        for s in servers:
            s.kill_if_running()
        callbacks.close()
        if {k: v for k, v in env.leftovers().items() if set(v) - set(before.get(k, []))}:
            env.clean()
        shutil.rmtree(env.state, ignore_errors=True)


def check_output(path: Path, name: str, job_id: int, says: str) -> int:
    """Tango's header once, success, and the job's own output, complete."""
    lines = path.read_text(errors="replace").splitlines()
    assert re.fullmatch(autograder_re(f"Received job {name}:{job_id}"), lines[0]), lines
    # a system error before the job ran (a sandbox that did not start) is
    # retried on a fresh VM and said so; the job itself still ran once
    tries = 0
    while re.match(autograder_re(f"Try {tries + 1} failed: "), lines[1]):
        tries += 1
        del lines[1]
    assert len(lines) == 7, (path.name, lines)
    assert re.fullmatch(autograder_re("Success: Autodriver returned normally"), lines[1]), lines
    assert re.fullmatch(autograder_re("Here is the output from the autograder:"), lines[2]), lines
    assert lines[3] == "---", lines
    assert lines[4] == "Autodriver: Job exited with status 0", lines
    assert lines[5:] == [f"start-{says}", f"done-{says}"], lines
    assert sum("Received job" in line for line in lines) == 1, lines
    return tries
