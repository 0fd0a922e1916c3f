"""A Tango-compatible HTTP server (tango-compat.md section 5).

Built on aiohttp: it is already a dependency (aiodocker rides on it), it
streams request bodies to disk without buffering them, and its client does
the callbacks; nothing else is pulled in.

Every route answers with and without its trailing slash; every JSON answer
is HTTP 200 with ``statusId`` 0 or -1, as Tango's. Jobs are written to the
store before ``Job added`` is answered, and a restarted server runs again
every job that had not finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import anyio.abc
import anyio.to_thread
from aiohttp import web

from ..errors import JobError, PoolClosedError, UnknownImageError, VMPoolError
from ..manager import Manager
from ..metrics import escape_label_value
from ..models import TangoJob, TangoMachine, pool_name
from ..scheduler import JobHandle, Outcome
from ..threads import SerialThread
from .callbacks import Callbacks
from .config import ServerConfig
from .jobspec import (
    TANGO_VMMS,
    check_file_name,
    check_image_name,
    lab_problem,
    parse_job,
    vmms_of,
)
from .labs import known_md5, lab_md5s, md5_of, record_upload
from .store import SQLiteStore

log = logging.getLogger("vmpool.server")

HELLO = "Hello, world! RESTful Tango here!\n"
#: the largest pool prealloc may ask for (a typo must not mean a million VMs)
MAX_PREALLOC = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def ok(msg: str, **extra: Any) -> web.Response:
    return web.json_response({"statusId": 0, "statusMsg": msg, **extra})


def fail(msg: str, **extra: Any) -> web.Response:
    return web.json_response({"statusId": -1, "statusMsg": msg, **extra})


class TangoServer:
    """The routes, over the server's own Manager and a store.

    Made by :func:`vmpool.server.app.running`, which enters the manager and
    hands :meth:`start` the task group that owns the background work
    (callbacks) and the HTTP client that sends them.
    """

    def __init__(self, config: ServerConfig, store: SQLiteStore, owner: str | None = None) -> None:
        self.config = config
        self.manager = Manager(config.job_settings(), on_done=[self.on_done], owner=owner)
        self.store = store
        self.courselabs = Path(config.courselabs)
        # owner-only: handins, graders and outputs of every course are below
        self.courselabs.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.courselabs, 0o700)
        self.started = time.time()
        self.callbacks: Callbacks | None = None
        #: jobs accepted (and stored) that wait for their driver to answer
        self.waiting: dict[int, TangoJob] = {}
        #: exceptions caught at the edge of background tasks
        self.background_errors = 0
        self._tg: anyio.abc.TaskGroup | None = None
        # every store call in the store's own thread, in order, never on the
        # event loop (one hand-off for a burst of calls, not one per call)
        self._store_thread = SerialThread("vmpool-store")
        self._keys = set(config.keys)
        self._live_meta: dict[int, tuple[str, str]] = {}

    # ------------------------------------------------------------ plumbing

    def start(self, tg: anyio.abc.TaskGroup, http: aiohttp.ClientSession) -> None:
        """Background work (callbacks) runs in ``tg``; callbacks go through ``http``."""
        self._tg = tg
        self.callbacks = Callbacks(
            self.config, lambda job_id: self.db(self.store.callback_done, job_id), http)

    def close_store(self) -> None:
        """Finish the store calls made (blocks until the store's thread ends)."""
        self._store_thread.join()

    def stop(self) -> None:
        """No new background work: jobs still running are abandoned (they stay
        queued in the store and run again at the next start, and so do
        callbacks not yet delivered)."""
        self.manager.scheduler.abandoning = True
        self._tg = None

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a store call) in the store's thread, in order."""
        return await self._store_thread.call(fn, *args)

    def background(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``fn(*args)`` in the server's task group, inside an error
        boundary: whatever it raises is logged and counted, never fatal."""
        if self._tg is None:
            return

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                self.background_errors += 1
                log.exception("background task %s failed", getattr(fn, "__name__", fn))

        self._tg.start_soon(guarded)

    def callback(self, job_id: int, url: str, output_file: str) -> None:
        """Send the job's callback in the background (not while stopping)."""
        if self.callbacks is not None:
            self.background(self.callbacks.send, job_id, url, output_file)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_upload_bytes)
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/", self.hello),
            ("GET", "/open/{key}/{courselab}", self.open),
            ("POST", "/upload/{key}/{courselab}", self.upload),
            ("POST", "/addJob/{key}/{courselab}", self.add_job),
            ("GET", "/poll/{key}/{courselab}/{outputFile}", self.poll),
            ("GET", "/getPartialOutput/{key}/{jobId}", self.partial_output),
            ("GET", "/info/{key}", self.info),
            ("GET", "/jobs/{key}/{deadJobs}", self.jobs),
            ("GET", "/pool/{key}", self.pool),
            ("GET", "/pool/{key}/{image}", self.pool),
            ("GET", "/prealloc/{key}/{image}/{num}", self.prealloc),
            ("POST", "/prealloc/{key}/{image}/{num}", self.prealloc),
            ("GET", "/metrics", self.metrics),
            ("GET", "/hosts/{key}", self.hosts),
            ("POST", "/hosts/{key}/{host}/drain", self.drain_host),
            ("POST", "/hosts/{key}/{host}/undrain", self.drain_host),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            if path != "/":
                app.router.add_route(method, path + "/", handler)
        # tango-cli's --pool with its default --image "" asks /pool/<key>//
        app.router.add_route("GET", "/pool/{key}//", self.pool)
        app.middlewares.append(self._errors)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A bug must never surface as a bare 500 page to Autolab.
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            # a body over client_max_size (addJob, prealloc): Tango's JSON, not a 413 page
            return fail(f"Request body too large (limit {self.config.max_upload_bytes} bytes)")
        except web.HTTPException:
            raise
        except Exception as e:
            log.exception("%s %s failed", request.method, request.path)
            return fail(f"Internal error: {type(e).__name__}: {e}")

    def _key_ok(self, request: web.Request) -> bool:
        return request.match_info.get("key") in self._keys

    def _lab_dir(self, key: str, courselab: str) -> Path | None:
        if lab_problem(key, courselab) is not None:
            return None
        return self.courselabs / f"{key}-{courselab}"

    def _existing_lab(self, request: web.Request) -> Path | web.Response:
        """The request's courselab directory, or the failure to answer with
        (a key not recognized; a courselab bad or not opened)."""
        if not self._key_ok(request):
            return fail("Key not recognized")
        lab = self._lab_dir(request.match_info["key"], request.match_info["courselab"])
        if lab is None or not lab.is_dir():
            return fail("Courselab not found")
        return lab

    # -------------------------------------------------------------- routes

    async def hello(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=HELLO)

    async def open(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        key, courselab = request.match_info["key"], request.match_info["courselab"]
        lab = self._lab_dir(key, courselab)
        if lab is None:
            return fail(f"Invalid courselab name: {lab_problem(key, courselab)}")
        created = not lab.is_dir()
        lab.mkdir(mode=0o700, exist_ok=True)
        (lab / "output").mkdir(mode=0o700, exist_ok=True)
        files = await anyio.to_thread.run_sync(lab_md5s, lab)
        return ok("Created directory" if created else "Found directory", files=files)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        lab = self._existing_lab(request)
        if isinstance(lab, web.Response):
            return lab
        name = request.headers.get("Filename")
        problem = check_file_name(name)
        if problem is not None:
            return fail(f"Invalid file name: {problem}")
        assert name is not None
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            return fail(f"File too large: {request.content_length} bytes (limit {limit})")
        tmp = lab / f".upload-{os.getpid()}-{threading.get_ident()}-{id(request):x}"
        h = hashlib.md5()
        size = 0
        try:
            fd = await anyio.to_thread.run_sync(
                os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            # written in a thread, a MiB at a time: the loop never waits for the disk
            async with await anyio.open_file(fd, "wb") as out:
                pending: list[bytes] = []
                buffered = 0
                async for chunk in request.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        return fail(f"File too large: more than {limit} bytes")
                    h.update(chunk)
                    pending.append(chunk)
                    buffered += len(chunk)
                    if buffered >= 1 << 20:
                        await out.write(b"".join(pending))
                        pending, buffered = [], 0
                if pending:
                    await out.write(b"".join(pending))
            target = lab / name
            digest = h.hexdigest()
            old = await anyio.to_thread.run_sync(known_md5, target)
            if old is None and await anyio.Path(target).is_file():
                old = await anyio.to_thread.run_sync(md5_of, target)
            if old == digest:
                return ok("File exists")
            await anyio.to_thread.run_sync(os.replace, tmp, target)
            await anyio.to_thread.run_sync(record_upload, target, digest)
            return ok("Uploaded file")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def add_job(self, request: web.Request) -> web.StreamResponse:
        lab = self._existing_lab(request)
        if isinstance(lab, web.Response):
            return lab
        key, courselab = request.match_info["key"], request.match_info["courselab"]
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError) as e:
            return fail(f"Invalid job: the body is not JSON ({e})")
        image_problem = None
        if isinstance(body, dict) and check_image_name(body.get("image")) is None:
            image_problem = await self._image_problem(body["image"], vmms_of(body))
        job, problems = parse_job(
            body, lab, image_problem,
            default_output_bytes=self.manager.settings.max_output_file_size,
            max_output_bytes=self.config.max_output_kb * 1024)
        if isinstance(body, dict) and problems == [f"unknown image {body.get('image')!r}"]:
            return fail("Invalid image name")  # Tango's answer when that is all
        if problems or job is None:
            return fail("Invalid job: " + "; ".join(problems))
        try:
            await self.manager.driver(job.vm.vmms or self.manager.settings.default_vmms)
            self.manager.scheduler.validate(job)
            self.manager.pool_for_job(job)
        except UnknownImageError:
            return fail("Invalid image name")
        except JobError as e:
            return fail("Invalid job: " + "; ".join(e.problems))
        except VMPoolError as e:
            return fail(f"Invalid job: {e}")
        # A stale output of the same name must not be taken for this job's.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(job.outputFile)
        job_id = await self.db(self.store.add, job, key, courselab)
        try:
            self.submit(job, key, courselab)
        except PoolClosedError:
            return fail("Server is shutting down; the job will run after restart",
                        jobId=str(job_id))
        return ok("Job added", jobId=str(job_id))

    async def _image_problem(self, image: str, vmms: str | None) -> str | None:
        """Why no pool can be made for ``image`` (None if one can). Answered at
        once: Tango waits forever for a VM of an image that does not exist."""
        from ..pool import PoolSpec

        name = vmms or self.manager.settings.default_vmms
        try:
            await self.manager.driver(name)
            self.manager.check_image(PoolSpec(image, name))
        except UnknownImageError:
            return f"unknown image {image!r}"
        except VMPoolError as e:
            return f"driver {name!r}: {e}"
        return None

    def submit(self, job: TangoJob, key: str, courselab: str) -> JobHandle:
        # pools share their VMs fairly between courselabs (one course's
        # deadline flood does not hold every other course's jobs behind it)
        job.courselab = f"{key}-{courselab}"
        h = self.manager.scheduler.submit(job)
        self._live_meta[h.id] = (key, courselab)
        return h

    async def poll(self, request: web.Request) -> web.StreamResponse:
        lab = self._existing_lab(request)
        if isinstance(lab, web.Response):
            return lab
        name = request.match_info["outputFile"]
        if check_file_name(name) is not None:
            return fail("Output file not found")
        path = lab / "output" / name
        try:
            data = await anyio.Path(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return fail("Output file not found")
        return web.Response(body=data, content_type="application/octet-stream")

    async def partial_output(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        try:
            job_id = int(request.match_info["jobId"])
        except ValueError:
            return fail("Invalid job id")
        key = request.match_info["key"]
        h = self.manager.scheduler.live.get(job_id)
        if h is not None and self._key_of(h.id, h.job) != key:
            h = None  # another key's job: as if there were none
        if h is None:
            stored = await self.db(self.store.get, job_id)
            if stored is None or stored.key != key:
                return fail("Job not found")
            text = ""
            with contextlib.suppress(OSError):
                text = (await anyio.Path(stored.job.outputFile).read_bytes()).decode(
                    errors="replace"
                )
            return ok("Partial output obtained", output=text)
        data = None
        if h.vm is not None:
            with contextlib.suppress(Exception):
                data = await h.pool.driver.partialOutput(h.vm)
        if data is not None:
            return ok("Partial output obtained", output=data.decode(errors="replace"))
        # Not running yet, or a driver that cannot tell: where the job stands.
        lines = [f"{t.split('|', 1)[-1]}" for t in h.job.trace]
        return ok("Partial output obtained", output="\n".join(lines) + "\n")

    async def info(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        c = self.manager.scheduler.counters
        info = {
            "elapsed_secs": round(time.time() - self.started, 3),
            "job_requests": c.job_requests,
            "job_retries": c.job_retries,
            "waitvm_timeouts": c.waitvm_timeouts,
            "runjob_timeouts": c.runjob_timeouts,
            "copyin_errors": c.copyin_errors,
            "runjob_errors": c.runjob_errors,
            "copyout_errors": c.copyout_errors,
            "num_threads": threading.active_count(),
            "live_jobs": len(self.manager.scheduler.live),
            "waiting_for_driver": len(self.waiting),
            "background_errors": self.background_errors,
            "outcomes": dict(c.outcomes),
            "callbacks_sent": self.callbacks.sent if self.callbacks else 0,
            "callbacks_failed": self.callbacks.failed if self.callbacks else 0,
            "callbacks_tls_refused": self.callbacks.tls_refused if self.callbacks else 0,
            "callback_errors": self.callbacks.errors if self.callbacks else 0,
            # Autolab's jobs page takes it from now to compare with the trace's
            # times (local ctime): seconds west of UTC, as time.timezone
            "timezone_offset": time.altzone if time.localtime().tm_isdst > 0 else time.timezone,
        }
        return ok("Found info successfully", info=info)

    async def jobs(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        dead = request.match_info["deadJobs"]
        if dead not in ("0", "1"):
            return fail("deadJobs must be 0 (live jobs) or 1 (dead jobs)")
        # A key sees the jobs of its own courselabs only (stricter than Tango,
        # which shows every job to every key).
        key = request.match_info["key"]
        if dead == "0":
            jobs = [self._live_dict(h) for h in list(self.manager.scheduler.live.values())
                    if self._key_of(h.id, h.job) == key]
            # and those waiting for their driver (down at the last start)
            jobs += [j.to_dict() for i, j in list(self.waiting.items())
                     if self._key_of(i, j) == key]
        else:
            jobs = [s.job.to_dict() for s in await self.db(self.store.done) if s.key == key]
        return ok("Found list of jobs", jobs=jobs)

    def _key_of(self, job_id: int, job: TangoJob) -> str | None:
        """The key that added a job not yet finished."""
        meta = self._live_meta.get(job_id)
        if meta is not None:
            return meta[0]
        # its courselab folder is <key>-<courselab>: the longest key that fits
        lab = Path(job.outputFile).parent.parent.name
        fits = [k for k in self._keys if lab.startswith(f"{k}-")]
        return max(fits, key=len) if fits else None

    @staticmethod
    def _live_dict(h: JobHandle) -> dict[str, Any]:
        d = h.job.to_dict()
        if h.vm is not None:
            d["vm"]["id"] = h.vm.id  # the VM it runs on, as Tango's job.vm
        return d

    async def pool(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        image = request.match_info.get("image")
        pools: dict[str, dict[str, Any]] = {}
        for p in self.manager.pools.values():
            st = p.status()
            pools[p.spec.key] = {"total": st.total_ids, "free": st.free_ids}
            per_host = _per_host(p.inventory(), st.busy_ids)
            if per_host:
                pools[p.spec.key]["hosts"] = per_host
        if image is None:
            return ok("Found all pools", pools=pools)
        name = pool_name(image)
        found = {k: v for k, v in pools.items() if k == name or k.startswith(name + "[")}
        if not found:
            return fail("Pool not found")
        return ok("Found pool", pools=found)

    def _hosts(self) -> dict[str, dict[str, dict[str, Any]]]:
        """driver -> host -> state, VMs, room, last error (drivers with hosts)."""
        return {name: h for name, drv in self.manager.drivers().items() if (h := drv.hosts())}

    async def hosts(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        return ok("Found hosts", hosts=self._hosts())

    async def drain_host(self, request: web.Request) -> web.StreamResponse:
        """Drain a host (no new VMs, running jobs finish, then its VMs go),
        or put it back (``/undrain``)."""
        if not self._key_ok(request):
            return fail("Key not recognized")
        host = request.match_info["host"]
        draining = request.path.rstrip("/").endswith("/drain")
        for name, drv in self.manager.drivers().items():
            if host in drv.hosts():
                drv.drain_host(host, draining)
                log.info("host %s of driver %s %s", host, name,
                         "draining" if draining else "back in use")
                return ok(f"Host {host} {'draining' if draining else 'back in use'}",
                          hosts=self._hosts())
        return fail(f"Host not found: {host}")

    async def prealloc(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        image = request.match_info["image"]
        if check_image_name(image) is not None:
            return fail("Invalid image name")
        try:
            num = int(request.match_info["num"])
        except ValueError:
            return fail("Invalid prealloc size")
        if num < 0:
            return fail("Invalid prealloc size")
        if num > MAX_PREALLOC:
            return fail(f"Invalid prealloc size: at most {MAX_PREALLOC}")
        spec: dict[str, Any] = {}
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError:
                    return fail("Preallocate VM failed: the body is not JSON")
                if not isinstance(body, dict):
                    return fail("Preallocate VM failed: the body must be a JSON object")
                for k in ("cores", "memory"):
                    if body.get(k) is not None:
                        if isinstance(body[k], bool) or not isinstance(body[k], int) \
                                or body[k] <= 0:
                            return fail(f"Preallocate VM failed: '{k}' must be a positive "
                                        "integer")
                        spec[k] = body[k]
                # Tango ignores it; tango-cli sends "localDocker" by default
                if isinstance(body.get("vmms"), str) and body["vmms"] not in TANGO_VMMS:
                    spec["vmms"] = body["vmms"]
        try:
            await self.manager.resize(image, num, **spec)
        except UnknownImageError:
            return fail("Invalid image name")
        except (VMPoolError, ValueError) as e:
            return fail(f"Preallocate VM failed: {e}")
        return ok("VMs preallocated")

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        lines = []
        c = self.manager.scheduler.counters

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP vmpool_{name} {help_}")
            lines.append(f"# TYPE vmpool_{name} {kind}")
            for labels, value in samples:
                lines.append(f"vmpool_{name}{labels} {value}")

        metric("jobs_total", "counter", "Jobs accepted.", [("", c.job_requests)])
        metric("job_retries_total", "counter", "Tries repeated on a fresh VM.",
               [("", c.job_retries)])
        metric("job_outcomes_total", "counter", "Jobs ended, by outcome.",
               [(f'{{outcome="{escape_label_value(k)}"}}', v) for k, v in c.outcomes.items()])
        for name, value in (("waitvm_timeouts", c.waitvm_timeouts),
                            ("runjob_timeouts", c.runjob_timeouts),
                            ("copyin_errors", c.copyin_errors),
                            ("runjob_errors", c.runjob_errors),
                            ("copyout_errors", c.copyout_errors)):
            metric(f"{name}_total", "counter", f"Tango's {name} counter.", [("", value)])
        cb = self.callbacks
        metric("callbacks_total", "counter", "Callbacks, by result.",
               [('{result="sent"}', cb.sent if cb else 0),
                ('{result="failed"}', cb.failed if cb else 0),
                ('{result="tls_refused"}', cb.tls_refused if cb else 0),
                ('{result="error"}', cb.errors if cb else 0)])
        per_pool: dict[str, list[tuple[str, float]]] = {
            k: [] for k in ("free", "busy", "creating", "destroying", "queued", "failed")}
        for p in self.manager.pools.values():
            st = p.status()
            lab = f'{{pool="{escape_label_value(st.key)}"}}'
            per_pool["free"].append((lab, st.free))
            per_pool["busy"].append((lab, st.busy))
            per_pool["creating"].append((lab, st.creating))
            per_pool["destroying"].append((lab, st.destroying))
            per_pool["queued"].append((lab, st.waiting))
            per_pool["failed"].append((lab, st.failed))
        for k, samples in per_pool.items():
            kind = "counter" if k == "failed" else "gauge"
            name = "vm_creation_failures_total" if k == "failed" else (
                "jobs_queued" if k == "queued" else f"vms_{k}")
            metric(name, kind, f"Per pool: {k}.", samples)
        host_vms: list[tuple[str, float]] = []
        host_busy: list[tuple[str, float]] = []
        host_state: list[tuple[str, float]] = []
        for driver_name, hosts in self._hosts().items():
            for host, info in hosts.items():
                lab = (f'{{driver="{escape_label_value(driver_name)}",'
                       f'host="{escape_label_value(host)}"')
                host_vms.append((lab + "}", info.get("vms", 0)))
                host_state.extend((lab + f',state="{state}"}}', int(info.get("state") == state))
                                  for state in ("up", "down", "draining", "new"))
        for p in self.manager.pools.values():
            for host, counts in _per_host(p.inventory(), p.status().busy_ids).items():
                lab = (f'{{pool="{escape_label_value(p.spec.key)}",'
                       f'host="{escape_label_value(host)}"}}')
                host_busy.append((lab, counts["busy"]))
        metric("host_vms", "gauge", "Per host: VMs placed there.", host_vms)
        metric("host_busy_vms", "gauge", "Per pool and host: VMs running a job.", host_busy)
        metric("host_state", "gauge", "Per host: 1 for its state (up, down, draining).",
               host_state)
        metric("background_errors_total", "counter",
               "Exceptions caught at the edge of background tasks.",
               [("", self.background_errors)])
        metric("jobs_waiting_for_driver", "gauge",
               "Jobs whose driver was down at the last start, waiting for it.",
               [("", len(self.waiting))])
        metric("live_jobs", "gauge", "Jobs accepted and not ended.",
               [("", len(self.manager.scheduler.live))])
        sch = self.manager.scheduler
        for hist in (sch.queue_wait, sch.step_seconds, sch.job_seconds):
            lines.extend(hist.render())
        return web.Response(text="\n".join(lines) + "\n",
                            content_type="text/plain", charset="utf-8")

    # ---------------------------------------------------------- job ending

    async def on_done(self, h: JobHandle) -> None:
        """Record the end (before the callback: a crash re-runs nothing done)."""
        r = h.result
        if r is None or self._tg is None:
            return
        if r.outcome is Outcome.CANCELLED and self.manager.scheduler.abandoning:
            return  # shutting down: the job stays queued in the store and reruns
        await self.db(self.store.finish, h.job, r.outcome.value, r.message, r.run_seconds,
                      r.queue_wait)
        self._live_meta.pop(h.id, None)
        if h.job.notifyURL:
            self.callback(h.id, h.job.notifyURL, h.job.outputFile)


def _per_host(vms: list[TangoMachine], busy: list[int]) -> dict[str, dict[str, int]]:
    """Host -> VMs and busy VMs, for VMs whose driver says where they live."""
    out: dict[str, dict[str, int]] = {}
    for vm in vms:
        if vm.domain_name:
            c = out.setdefault(vm.domain_name, {"vms": 0, "busy": 0})
            c["vms"] += 1
            c["busy"] += vm.id in busy
    return out
