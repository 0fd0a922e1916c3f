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
import math
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.to_thread
from aiohttp import web

from .errors import JobError, PoolClosedError, UnknownImageError, VMPoolError
from .manager import Manager
from .models import InputFile, TangoJob, TangoMachine, pool_name
from .scheduler import JobHandle, Outcome
from .serverconfig import ServerConfig
from .store import SQLiteStore
from .vmms import check_dest_name

log = logging.getLogger("vmpool.server")

HELLO = "Hello, world! RESTful Tango here!\n"
#: the longest file name most file systems take, in bytes
NAME_MAX = 255
#: the largest pool prealloc may ask for (a typo must not mean a million VMs)
MAX_PREALLOC = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ok(msg: str, **extra: Any) -> web.Response:
    return web.json_response({"statusId": 0, "statusMsg": msg, **extra})


def fail(msg: str, **extra: Any) -> web.Response:
    return web.json_response({"statusId": -1, "statusMsg": msg, **extra})


def check_file_name(name: str | None) -> str | None:
    """The problem with an uploaded or output file name, or None if it is fine."""
    if name is None or name == "":
        return "file name is empty"
    if "\x00" in name:
        return "file name contains a NUL byte"
    if "/" in name or "\\" in name:
        return f"file name {name!r} contains a '/'"
    if name in (".", "..") or name.startswith(".."):
        return f"file name {name!r} is not allowed"
    try:
        if len(os.fsencode(name)) > NAME_MAX:
            return f"file name is longer than {NAME_MAX} bytes"
    except UnicodeEncodeError:  # a lone surrogate (a "\ud800" JSON escape)
        return f"file name {name!r} is not valid Unicode"
    return None


def _lab_problem(key: str, courselab: str) -> str | None:
    """The problem with a courselab name (its folder is ``<key>-<courselab>``)."""
    return check_file_name(courselab) or check_file_name(f"{key}-{courselab}")


def _finite(x: float) -> bool:
    """Not NaN nor infinite, and (an int) not too large for a float."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TangoServer:
    """The routes, over a running Manager and a store."""

    def __init__(self, config: ServerConfig, manager: Manager, store: SQLiteStore) -> None:
        self.config = config
        self.manager = manager
        self.store = store
        self.courselabs = Path(config.courselabs)
        # owner-only: handins, graders and outputs of every course are below
        self.courselabs.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.courselabs, 0o700)
        self.started = time.time()
        self.callbacks_sent = 0
        self.callbacks_failed = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._http: aiohttp.ClientSession | None = None
        self._keys = set(config.keys)
        self._live_meta: dict[int, tuple[str, str]] = {}

    # ------------------------------------------------------------ plumbing

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
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            if path != "/":
                app.router.add_route(method, path + "/", handler)
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
        if _lab_problem(key, courselab) is not None:
            return None
        return self.courselabs / f"{key}-{courselab}"

    # -------------------------------------------------------------- routes

    async def hello(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=HELLO)

    async def open(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        key, courselab = request.match_info["key"], request.match_info["courselab"]
        lab = self._lab_dir(key, courselab)
        if lab is None:
            return fail(f"Invalid courselab name: {_lab_problem(key, courselab)}")
        created = not lab.is_dir()
        lab.mkdir(mode=0o700, exist_ok=True)
        (lab / "output").mkdir(mode=0o700, exist_ok=True)
        files = await anyio.to_thread.run_sync(self._md5s, lab)
        return ok("Created directory" if created else "Found directory", files=files)

    @staticmethod
    def _md5s(lab: Path) -> dict[str, str]:
        return {p.name: _md5(p) for p in sorted(lab.iterdir()) if p.is_file()
                and not p.name.startswith(".")}

    async def upload(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        key, courselab = request.match_info["key"], request.match_info["courselab"]
        lab = self._lab_dir(key, courselab)
        if lab is None or not lab.is_dir():
            return fail("Courselab not found")
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
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as out:  # noqa: ASYNC230 - small writes, streamed
                async for chunk in request.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        return fail(f"File too large: more than {limit} bytes")
                    h.update(chunk)
                    out.write(chunk)
            target = lab / name
            digest = h.hexdigest()
            if target.is_file() and await anyio.to_thread.run_sync(_md5, target) == digest:
                return ok("File exists")
            os.replace(tmp, target)
            return ok("Uploaded file")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def add_job(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        key, courselab = request.match_info["key"], request.match_info["courselab"]
        lab = self._lab_dir(key, courselab)
        if lab is None or not lab.is_dir():
            return fail("Courselab not found")
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError) as e:
            return fail(f"Invalid job: the body is not JSON ({e})")
        job, problems = await self._job_from_json(body, lab)
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
        job_id = self.store.add(job, key, courselab)
        try:
            self._submit(job, key, courselab)
        except PoolClosedError:
            return fail("Server is shutting down; the job will run after restart",
                        jobId=str(job_id))
        return ok("Job added", jobId=str(job_id))

    async def _job_from_json(
        self, body: Any, lab: Path
    ) -> tuple[TangoJob | None, list[str]]:
        problems: list[str] = []
        if not isinstance(body, dict):
            return None, ["the body must be a JSON object"]
        for field in ("image", "jobName", "output_file", "files"):
            if field not in body:
                problems.append(f"missing field '{field}'")
        image = body.get("image")
        if "image" in body and (not isinstance(image, str) or not image):
            problems.append("'image' must be a non-empty string")
        name = body.get("jobName")
        if "jobName" in body and (not isinstance(name, str) or not name):
            problems.append("'jobName' must be a non-empty string")
        output = body.get("output_file")
        if "output_file" in body:
            p = check_file_name(output if isinstance(output, str) else None)
            if p:
                problems.append(f"'output_file': {p}")
        files = body.get("files")
        inputs: list[InputFile] = []
        if "files" in body:
            if not isinstance(files, list) or not files:
                problems.append("'files' must be a non-empty list")
            else:
                for i, f in enumerate(files):
                    if not isinstance(f, dict) or not isinstance(f.get("localFile"), str) \
                            or not isinstance(f.get("destFile"), str):
                        problems.append(f"files[{i}] must have string localFile and destFile")
                        continue
                    p = check_file_name(f["localFile"])
                    if p:
                        problems.append(f"files[{i}].localFile: {p}")
                        continue
                    local = lab / f["localFile"]
                    if not local.is_file():
                        problems.append(f"input file {f['localFile']} was not uploaded")
                    try:
                        check_dest_name(f["destFile"])
                    except JobError as e:
                        problems.extend(f"files[{i}]: {p}" for p in e.problems)
                    inputs.append(InputFile(str(local), f["destFile"]))
                if not any(f.destFile == "Makefile" for f in inputs):
                    problems.append("no file has destFile 'Makefile'")
        timeout = body.get("timeout", 0)
        if timeout is None:
            timeout = 0
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0 \
                or not _finite(timeout):
            problems.append(f"'timeout' must be a number >= 0 and finite, got {timeout!r}")
            timeout = 0
        max_kb = body.get("max_kb")
        if max_kb is not None and (isinstance(max_kb, bool) or not isinstance(max_kb, int)
                                   or max_kb <= 0):
            problems.append(f"'max_kb' must be a positive integer, got {max_kb!r}")
            max_kb = None
        callback = body.get("callback_url") or body.get("notifyURL")
        if callback is not None and (not isinstance(callback, str)
                                     or not re.match(r"^https?://", callback)):
            problems.append(f"'callback_url' must be an http(s) URL, got {callback!r}")
            callback = None
        disable_network = body.get("disable_network", False)
        if not isinstance(disable_network, bool):
            problems.append("'disable_network' must be true or false")
        cores, memory = body.get("cores"), body.get("memory")
        for label, v in (("cores", cores), ("memory", memory)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                problems.append(f"'{label}' must be a positive integer, got {v!r}")
        if isinstance(image, str) and image:
            vmms = body.get("vmms") if isinstance(body.get("vmms"), str) else None
            problem = await self._image_problem(image, vmms, body.get("cores"),
                                                body.get("memory"))
            if problem:
                problems.append(problem)
        if problems:
            return None, problems
        assert isinstance(image, str) and isinstance(name, str) and isinstance(output, str)
        vm = TangoMachine(name=pool_name(image), image=image, cores=cores, memory=memory,
                          vmms=body.get("vmms") if isinstance(body.get("vmms"), str) else None)
        job = TangoJob(
            vm=vm,
            outputFile=str(lab / "output" / output),
            name=name,
            input=inputs,
            notifyURL=callback,
            timeout=float(timeout),
            maxOutputFileSize=int(max_kb) * 1024 if max_kb else 0,
            accessKeyId=body.get("accessKeyId"),
            accessKey=body.get("accessKey"),
            disableNetwork=bool(disable_network),
        )
        return job, []

    async def _image_problem(self, image: str, vmms: str | None, cores: Any,
                             memory: Any) -> str | None:
        """Why no pool can be made for ``image`` (None if one can). Answered at
        once: Tango waits forever for a VM of an image that does not exist."""
        from .pool import PoolSpec

        name = vmms or self.manager.settings.default_vmms
        try:
            await self.manager.driver(name)
            self.manager.check_image(PoolSpec(image, name))
        except UnknownImageError:
            return f"unknown image {image!r}"
        except VMPoolError as e:
            return f"driver {name!r}: {e}"
        return None

    def _submit(self, job: TangoJob, key: str, courselab: str) -> JobHandle:
        h = self.manager.scheduler.submit(job)
        self._live_meta[h.id] = (key, courselab)
        return h

    async def poll(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        key, courselab = request.match_info["key"], request.match_info["courselab"]
        lab = self._lab_dir(key, courselab)
        if lab is None or not lab.is_dir():
            return fail("Courselab not found")
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
        h = self.manager.scheduler.live.get(job_id)
        if h is None:
            stored = self.store.get(job_id)
            if stored is None:
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
            "outcomes": dict(c.outcomes),
            "callbacks_sent": self.callbacks_sent,
            "callbacks_failed": self.callbacks_failed,
        }
        return ok("Found info successfully", info=info)

    async def jobs(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        dead = request.match_info["deadJobs"]
        if dead not in ("0", "1"):
            return fail("deadJobs must be 0 (live jobs) or 1 (dead jobs)")
        if dead == "0":
            jobs = [h.job.to_dict() for h in self.manager.scheduler.live.values()]
        else:
            jobs = [s.job.to_dict() for s in await anyio.to_thread.run_sync(self.store.done)]
        return ok("Found list of jobs", jobs=jobs)

    async def pool(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        image = request.match_info.get("image")
        pools = {}
        for p in self.manager.pools.values():
            st = p.status()
            pools[p.spec.key] = {"total": st.total_ids, "free": st.free_ids}
        if image is None:
            return ok("Found all pools", pools=pools)
        name = pool_name(image)
        found = {k: v for k, v in pools.items() if k == name or k.startswith(name + "[")}
        if not found:
            return fail("Pool not found")
        return ok("Found pool", pools=found)

    async def prealloc(self, request: web.Request) -> web.StreamResponse:
        if not self._key_ok(request):
            return fail("Key not recognized")
        image = request.match_info["image"]
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
                if isinstance(body.get("vmms"), str):
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
               [(f'{{outcome="{k}"}}', v) for k, v in c.outcomes.items()])
        for name, value in (("waitvm_timeouts", c.waitvm_timeouts),
                            ("runjob_timeouts", c.runjob_timeouts),
                            ("copyin_errors", c.copyin_errors),
                            ("runjob_errors", c.runjob_errors),
                            ("copyout_errors", c.copyout_errors)):
            metric(f"{name}_total", "counter", f"Tango's {name} counter.", [("", value)])
        metric("callbacks_total", "counter", "Callbacks, by result.",
               [('{result="sent"}', self.callbacks_sent),
                ('{result="failed"}', self.callbacks_failed)])
        per_pool: dict[str, list[tuple[str, float]]] = {
            k: [] for k in ("free", "busy", "creating", "destroying", "queued", "failed")}
        for p in self.manager.pools.values():
            st = p.status()
            lab = f'{{pool="{st.key}"}}'
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
        await anyio.to_thread.run_sync(self.store.finish, h.job, r.outcome.value, r.message)
        self._live_meta.pop(h.id, None)
        if h.job.notifyURL:
            self._tg.start_soon(self._callback, h.id, h.job.notifyURL, h.job.outputFile)

    async def _callback(self, job_id: int, url: str, output_file: str) -> None:
        """Tango's callback: multipart POST, field ``file``, header ``Filename``."""
        name = os.path.basename(output_file)
        delay = self.config.callback_backoff
        assert self._http is not None
        for attempt in range(1, self.config.callback_tries + 1):
            try:
                data = await anyio.Path(output_file).read_bytes()
                form = aiohttp.FormData()
                form.add_field("file", data, filename=name,
                               content_type="application/octet-stream")
                timeout = aiohttp.ClientTimeout(total=self.config.callback_timeout)
                async with self._http.post(url, data=form, headers={"Filename": name},
                                           timeout=timeout) as resp:
                    if resp.status < 500:
                        self.callbacks_sent += 1
                        await anyio.to_thread.run_sync(self.store.callback_done, job_id)
                        log.info("callback for job %s to %s: HTTP %s", job_id, url, resp.status)
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
            log.warning("callback for job %s to %s failed (try %d/%d): %s", job_id, url,
                        attempt, self.config.callback_tries, problem)
            if attempt < self.config.callback_tries:
                await anyio.sleep(delay)
                delay *= 2
        self.callbacks_failed += 1
        await anyio.to_thread.run_sync(self.store.callback_done, job_id)

    async def recover(self) -> tuple[int, int]:
        """Run again every job a crash interrupted; returns (rerun, found complete)."""
        rerun = complete = 0
        for s in await anyio.to_thread.run_sync(self.store.unfinished):
            job = s.job
            if s.id in self.manager.scheduler.live:
                continue  # already running (never twice)
            if await anyio.Path(job.outputFile).is_file():
                # finished before the crash (the output is renamed into place
                # only when whole; addJob removed any stale one)
                self.store.finish(job, "recovered", "output complete before restart")
                complete += 1
                if job.notifyURL and self._tg is not None:
                    self._tg.start_soon(self._callback, s.id, job.notifyURL, job.outputFile)
                continue
            job.retries = 0
            job.assigned = False
            job.log(f"Job {job.name}:{job.id} requeued after a restart")
            try:
                await self.manager.driver(job.vm.vmms or self.manager.settings.default_vmms)
                self._submit(job, s.key, s.courselab)
                rerun += 1
            except VMPoolError as e:
                log.error("job %s cannot be rerun: %s", s.id, e)
                self.store.finish(job, "internal_error", f"cannot rerun after restart: {e}")
        for s in await anyio.to_thread.run_sync(self.store.pending_callbacks):
            if s.job.notifyURL and self._tg is not None:
                self._tg.start_soon(self._callback, s.id, s.job.notifyURL, s.job.outputFile)
        return rerun, complete


async def serve(
    config: ServerConfig,
    *,
    ready: Callable[[int], None] | None = None,
    stop: anyio.Event | None = None,
) -> None:
    """Run the server until ``stop`` is set (or forever); ``ready(port)`` once listening."""
    store = SQLiteStore(config.database)
    server: TangoServer | None = None

    async def done_hook(h: JobHandle) -> None:
        if server is not None:
            await server.on_done(h)

    manager = Manager(config.job_settings(), on_done=[done_hook])
    async with manager, anyio.create_task_group() as tg, aiohttp.ClientSession() as http:
        server = TangoServer(config, manager, store)
        server._tg = tg
        server._http = http
        # Recover before listening: a job added meanwhile would be found
        # unfinished in the store and submitted a second time.
        rerun, complete = await server.recover()
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = _bound_port(site, config.port)
        log.info("vmpool serving on %s:%s (%d jobs rerun, %d found complete)",
                 config.host, port, rerun, complete)
        if ready is not None:
            ready(port)
        try:
            if stop is None:
                await anyio.sleep_forever()
            else:
                await stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
            # Jobs still running are abandoned, not ended: they stay
            # queued in the store and run again at the next start, and so
            # do callbacks not yet delivered.
            manager.scheduler.abandoning = True
            server._tg = None
            tg.cancel_scope.cancel()
    store.close()


def _bound_port(site: web.TCPSite, default: int) -> int:
    """The port actually bound (``port = 0`` asks the OS for a free one)."""
    srv: Any = site._server
    sockets = getattr(srv, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else default
