"""Job recipes and helpers shared by the adversarial tests (bare autodriver,
local driver, Docker driver): one copy of each bomb."""

from __future__ import annotations

import contextlib
import http.server
import inspect
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from vmpool import JobHandle, JobResult, Manager, Settings, TangoJob, make_job
from vmpool_drivers.policy import UID_DIR

ELISION = b"\n...[excess bytes elided]...\n"

FORK_BOMB_PY = """\
import os
print("bombing", flush=True)
while True:
    try:
        os.fork()
    except OSError:
        pass
"""

MEMORY_BOMB_PY = """\
chunks = []
while True:
    chunks.append(b"x" * 10**6)  # touched memory, 1 MB at a time
"""

CGROUP_BOMB_PY = """\
import os, sys, time
for _ in range(4):
    if os.fork() == 0:
        x = bytearray(40 * 10**6)
        for i in range(0, len(x), 4096):
            x[i] = 1
        time.sleep(1000)  # ok-sleep: the bomb holds its memory
        os._exit(0)
pid, status = os.wait()
sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
print("a child was killed by signal %s" % sig, flush=True)
sys.exit(1)
"""

DAEMON_PY = """\
import os, sys, time
if os.fork():
    # return only once the daemon is up (bounded), so the recipe's next line
    # cannot end the job before the daemon has printed
    for _ in range(2000):
        if os.path.exists("daemon.up"):
            break
        time.sleep(0.005)  # ok-sleep: inside the job, waiting for its daemon
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
print("daemon up", flush=True)
open("daemon.up", "w").close()
time.sleep(1000)  # ok-sleep: the daemon that must not outlive the job
"""

def read_lines(h: JobHandle) -> list[str]:
    return Path(h.job.outputFile).read_text(errors="replace").splitlines()


async def finish(h: JobHandle, limit: float = 30) -> JobResult:
    with anyio.fail_after(limit):
        return await h.wait()


async def warm(mgr: Manager, image: str, n: int = 1, **spec: Any) -> None:
    pool = await mgr.ensure_pool(image, **spec)
    with anyio.fail_after(30):
        await pool.wait_until(lambda s: s.free >= n)


def driver_test_settings(vmms: str, **kw: Any) -> Settings:
    """Settings for a real driver's tests: generous deadlines, quick backoff."""
    base: dict[str, Any] = dict(
        default_vmms=vmms,
        pool_size=1,
        runjob_grace=3.0,
        waitvm_timeout=20,
        initializevm_timeout=30,
        copyin_timeout=20,
        copyout_timeout=20,
        destroy_timeout=20,
        backoff_initial=0.05,
        backoff_max=1.0,
    )
    base.update(kw)
    return Settings(**base)


def processes_of(uids: set[int]) -> list[str]:
    """Live (non-zombie) processes with one of ``uids`` as real, effective or saved uid."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ids = {int(v) for v in fields.get("Uid", "").split()[:3]}
        state = fields.get("State", "?").strip()[:1]
        if ids & uids and state not in ("Z", "X"):
            found.append(f"{name} {fields.get('Name', '').strip()} uids={sorted(ids)}")
    return found


def recipe_job(
    tmp: Path, name: str, image: str, recipe: list[str],
    files: dict[str, str] | None = None, **kw: Any,
) -> TangoJob:
    """A job in ``tmp/jobs/name`` whose Makefile runs ``recipe`` (one line a
    command), with ``files`` beside it; its output goes to ``tmp/out``."""
    d = tmp / "jobs" / name
    d.mkdir(parents=True)
    (d / "Makefile").write_text("all:\n" + "".join(f"\t{line}\n" for line in recipe))
    inputs = [(str(d / "Makefile"), "Makefile")]
    for fname, text in (files or {}).items():
        (d / fname).write_text(text)
        inputs.append((str(d / fname), fname))
    return make_job(image, inputs, str(tmp / "out" / f"{name}.out"), name=name, **kw)


# A neighbour: 90 busy processes, each in a session of its own, until the
# test writes "release" into the job's directory (or kills the job).
HOG_PY = """\
import os, sys, time
for _ in range(90):
    if os.fork() == 0:
        os.setsid()
        while True:
            pass
print("holding 90", flush=True)
open("hogging", "w").close()
while not os.path.exists("release"):
    time.sleep(0.05)  # ok-sleep: the neighbour holds until the test releases it
"""


def claims(uids: range) -> dict[int, str]:
    """uid -> holder of each claimed uid of ``uids`` (the host-wide registry)."""
    found = {}
    for uid in uids:
        with contextlib.suppress(OSError):
            found[uid] = (Path(UID_DIR) / str(uid) / "owner").read_text().strip()
    return found


async def docker_leftovers(docker_host: str, owner: str, uids: range) -> list[str]:
    """What of ``owner`` is left on the engine and this host: its containers
    (by the owner label, running or not), its uid claims of ``uids``, and
    processes of those uids other than those another owner holds."""
    import aiodocker

    async with aiodocker.Docker(url=docker_host) as docker:
        found = await docker.containers.list(
            all=True, filters={"label": [f"vmpool.owner={owner}"]})
        left = [f"container {c.id[:12]} {c._container.get('State')}" for c in found]
    held = claims(uids)
    mine = f"docker:{owner}/"
    left += [f"uid claim {u} ({h})" for u, h in held.items() if h.startswith(mine)]
    others = {u for u, h in held.items() if not h.startswith(mine)}
    left += [f"process {p}" for p in processes_of(set(uids) - others)]
    return left


class CallbackReceiver:
    """An HTTP listener on 127.0.0.1, in a thread of its own, taking the jobs'
    callbacks (Tango's multipart POST with a ``Filename`` header; any POST
    is answered 200). ``got``: (Filename, body) of each, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.cond:
                    outer.got.append((self.headers.get("Filename", ""), body))
                    outer.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/cb"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, names: set[str], limit: float) -> Counter[str]:
        with self.cond:
            self.cond.wait_for(lambda: names <= {n for n, _ in self.got}, timeout=limit)
            return Counter(n for n, _ in self.got)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


async def until(predicate: Any, limit: float = 20) -> None:
    """Wait until ``predicate()`` (a function, or a coroutine function) is
    true: a condition of another task's or process's state, polled, bounded
    by ``limit`` seconds."""
    with anyio.fail_after(limit):
        while True:
            got = predicate()
            if inspect.isawaitable(got):
                got = await got
            if got:
                return
            await anyio.sleep(0.02)  # ok-sleep: bounded wait for another task's effect
