"""The server never loses a job: restarts with jobs that cannot run, a
driver that is down at start, regrades across a crash, many distinct VM
specs, big outputs, bad settings. Real HTTP on 127.0.0.1, the sim driver
where scheduling is the point, the local and Docker drivers where a real
job or engine is."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from vmpool import Manager, Outcome, Settings, make_job
from vmpool.models import InputFile, TangoJob, TangoMachine
from vmpool.output import write_output_atomic
from vmpool.server import recovery
from vmpool.server.config import ConfigError, load_config
from vmpool.server.labs import lab_md5s
from vmpool.server.store import SQLiteStore

from .conftest import autograder_re
from .jobs import until
from .test_server import (
    MAKEFILE,
    _running,
    job_body,
    local_app,
    make_config,
    opened,
    wait_output,
)

MIB = 1 << 20


def sim_settings(**kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        default_vmms="sim", pool_size=1,
        driver_options={"sim": {"images": ["img.img"], "latency": {"runJob": 0.01}}},
    )
    base.update(kw)
    return Settings(**base)


@contextlib.asynccontextmanager
async def callback_catcher() -> AsyncIterator[tuple[str, list[tuple[str, bytes]]]]:
    """A callback listener on 127.0.0.1: yields its URL and what arrives
    (the multipart ``file`` field's file name and bytes, as Autolab reads it)."""
    got: list[tuple[str, bytes]] = []
    arrived = anyio.Event()

    async def catch(request: web.Request) -> web.Response:
        form = await request.post()
        f = form["file"]
        assert isinstance(f, web.FileField)
        got.append((f.filename, f.file.read()))
        arrived.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/cb", catch)
    async with local_app(app) as port:
        yield f"http://127.0.0.1:{port}/cb", got


def stored_job(tmp: Path, name: str, output: str, **vm: Any) -> TangoJob:
    lab = tmp / "labs" / "test-lab"
    (lab / "output").mkdir(parents=True, exist_ok=True)
    (lab / "Makefile").write_bytes(MAKEFILE)
    machine = TangoMachine(name=vm.pop("pool", "img"), image=vm.pop("image", "img.img"), **vm)
    return TangoJob(vm=machine, outputFile=str(lab / "output" / output), name=name,
                    input=[InputFile(str(lab / "Makefile"), "Makefile")], timeout=10)


# --------------------------------------------------------------------------
# a job that cannot run after a restart still ends: output file, callback


async def test_a_job_that_cannot_rerun_gets_an_output_file_and_its_callback(
    tmp_path: Path,
) -> None:
    async with callback_catcher() as (url, got):
        store = SQLiteStore(tmp_path / "jobs.sqlite")
        job = stored_job(tmp_path, "orphan", "orphan.out", vmms="nosuchdriver")
        job.notifyURL = url
        job_id = store.add(job, "test", "lab")
        store.close()
        async with _running(make_config(tmp_path, sim_settings())) as s:
            out = (await wait_output(s, "lab", "orphan.out")).decode().splitlines()
            await until(lambda: got)
            _, body, _ = await s.get("/")
            assert body == b"Hello, world! RESTful Tango here!\n"  # still serving
    assert out[0].endswith(f"Received job orphan:{job_id}")
    assert "cannot be run after a restart" in out[1] and "nosuchdriver" in out[1], out
    assert got == [("orphan.out", "\n".join(out).encode() + b"\n")]
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    try:
        assert store.unfinished() == [] and store.pending_callbacks() == []
    finally:
        store.close()


# --------------------------------------------------------------------------
# a regrade with the same output name, across a crash


async def test_a_regrade_is_never_given_the_earlier_output(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    first = stored_job(tmp_path, "hw1", "student.out")
    first_id = store.add(first, "test", "lab")
    # the first grading finished: its output is in place
    write_output_atomic(first.outputFile, f"Autograder [x]: Received job hw1:{first_id}\n"
                        "Autograder [x]: Success: Autodriver returned normally\nold score\n")
    store.finish(first, "success", "done")
    # the regrade was accepted, then the server crashed before it ran
    regrade = stored_job(tmp_path, "hw1", "student.out")
    regrade_id = store.add(regrade, "test", "lab")
    store.close()
    async with _running(make_config(tmp_path, sim_settings())) as s:
        with anyio.fail_after(20):
            while True:
                with contextlib.suppress(FileNotFoundError):
                    text = Path(regrade.outputFile).read_text()
                    if f"Received job hw1:{regrade_id}" in text:
                        break
                await anyio.sleep(0.02)  # ok-sleep: until the regrade's output is in place
        _, body, _ = await s.get("/jobs/test/1/")
    assert "old score" not in text and "Hello from the simulated job" in text, text
    finished = {j["id"]: j for j in body["jobs"]}
    assert regrade_id in {int(k) for k in finished}


# --------------------------------------------------------------------------
# a driver that is down at start: the server listens, its jobs wait


async def test_an_unreachable_docker_engine_does_not_stop_the_server(
    tmp_path: Path, docker_host: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recovery, "DRIVER_RETRY_MAX", 0.5)
    monkeypatch.setattr(recovery, "DRIVER_RETRY_FIRST", 0.2)
    engine = tmp_path / "engine"
    engine.mkdir()
    socket_path = engine / "docker.sock"  # nothing there yet: the engine is "down"
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    waiting = stored_job(tmp_path, "on-docker", "docker.out", image="vmpool/grader:latest",
                         pool="vmpool/grader:latest", vmms="docker")
    store.add(waiting, "test", "lab")
    store.close()
    settings = Settings(default_vmms="local", pool_size=1, runjob_grace=3.0, driver_options={
        "local": {"state_dir": str(tmp_path / "state"), "uid_base": 64600, "uid_count": 10},
        "docker": {"url": f"unix://{socket_path}"},
    })
    async with _running(make_config(tmp_path, settings)) as s:
        # listening, and the Docker job is queued where /jobs shows it
        _, body, _ = await s.get("/jobs/test/0/")
        assert [j["name"] for j in body["jobs"]] == ["on-docker"]
        # a local job runs at once
        await opened(s)
        _, body = await s.post("/addJob/test/lab/", json=job_body(image="default"))
        assert body["statusId"] == 0, body
        out = (await wait_output(s, "lab", "hello.out")).decode().splitlines()
        assert out[-1] == "hello from the server test"
        assert not Path(waiting.outputFile).exists()
        # the engine comes up: the waiting job runs
        socket_path.symlink_to(docker_host.removeprefix("unix://"))
        out = (await wait_output(s, "lab", "docker.out")).decode().splitlines()
    assert re.search(autograder_re("Success: Autodriver returned normally"), "\n".join(out))
    assert out[-1] == "hello from the server test"


# --------------------------------------------------------------------------
# many distinct specs: pools and VMs stay bounded


async def test_distinct_cores_and_memory_do_not_pile_up_pools(tmp_path: Path) -> None:
    settings = sim_settings(pool_size=2, max_implicit_pools=4, implicit_pool_idle=0.2)
    peak_pools = peak_vms = 0
    async with Manager(settings) as mgr:
        await mgr.ensure_pool("img.img")  # the image's own pool: 2 warm VMs
        for batch in range(10):
            handles = []
            for i in range(5):
                n = batch * 5 + i
                job = make_job("img.img", [(str(tmp_path / "Makefile"), "Makefile")],
                               str(tmp_path / f"out-{n}"), name=f"spec-{n}",
                               cores=1 + n % 7, memory=256 + 8 * n)
                (tmp_path / "Makefile").write_bytes(MAKEFILE)
                try:
                    handles.append(await mgr.submit(job))
                except ValueError as e:  # JobError: too many specs at once
                    assert "max_implicit_pools" in str(e)
            for h in handles:
                with anyio.fail_after(20):
                    assert (await h.wait()).outcome is Outcome.SUCCESS
                peak_pools = max(peak_pools, len(mgr.pools))
                peak_vms = max(peak_vms, len(mgr.inventory()))
        # idle implicit pools are dropped; the image's own pool stays warm
        await until(lambda: len(mgr.pools) == 1)
        (only,) = mgr.pools.values()
        assert only.spec.cores is None and only.status().free == 2
    assert peak_pools <= 1 + 4, peak_pools
    assert peak_vms <= 2 + 4 * 1 + 4, peak_vms  # warm ones + one per implicit pool (+ refills)


async def test_prealloc_with_cores_sizes_the_images_pool(tmp_path: Path) -> None:
    async with Manager(sim_settings(pool_size=1)) as mgr:
        await mgr.ensure_pool("img.img")
        pool = await mgr.resize("img.img", 3, cores=2, memory=512)
        await until(lambda: pool.status().free == 3)
        await until(lambda: sum(p.status().total for p in mgr.pools.values()) == 3)
        # a job naming no spec runs on the preallocated VMs (Tango's way)
        (tmp_path / "Makefile").write_bytes(MAKEFILE)
        h = await mgr.submit(make_job("img.img", [(str(tmp_path / "Makefile"), "Makefile")],
                                      str(tmp_path / "out"), name="plain"))
        with anyio.fail_after(20):
            await h.wait()
        assert h.vm is not None and h.vm.cores == 2 and h.vm.memory == 512


async def test_cores_beyond_the_drivers_limit_are_refused(tmp_path: Path) -> None:
    settings = Settings(default_vmms="local", pool_size=0, driver_options={"local": {
        "state_dir": str(tmp_path / "state"), "uid_base": 64620, "uid_count": 5}})
    async with Manager(settings) as mgr:
        (tmp_path / "Makefile").write_bytes(MAKEFILE)
        job = make_job("default", [(str(tmp_path / "Makefile"), "Makefile")],
                       str(tmp_path / "out"), cores=(os.cpu_count() or 1) + 1)
        with pytest.raises(ValueError, match=r"'cores' .* is more than driver 'local'"):
            await mgr.submit(job)


# --------------------------------------------------------------------------
# a 64 MiB output does not stall the event loop


async def test_a_64_mib_output_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    settings = Settings(default_vmms="local", pool_size=1, runjob_grace=3.0, driver_options={
        "local": {"state_dir": str(tmp_path / "state"), "uid_base": 64630, "uid_count": 5}})
    (tmp_path / "Makefile").write_text(
        "all:\n\t@python3 -c \"import sys; sys.stdout.buffer.write(b'x' * (64 << 20))\"\n")
    lag: list[float] = []
    async with Manager(settings) as mgr, anyio.create_task_group() as tg:
        await mgr.ensure_pool("default")

        async def watch() -> None:
            while True:  # how late a 1 ms timer fires: the loop's lag
                t = time.perf_counter()
                await anyio.sleep(0.001)
                lag.append(time.perf_counter() - t - 0.001)

        tg.start_soon(watch)
        h = await mgr.submit(make_job("default", [(str(tmp_path / "Makefile"), "Makefile")],
                                      str(tmp_path / "big.out"), name="big",
                                      max_output=64 * MIB + 1024, timeout=60))
        with anyio.fail_after(120):
            r = await h.wait()
        tg.cancel_scope.cancel()
    assert r.outcome is Outcome.SUCCESS
    assert Path(h.job.outputFile).stat().st_size > 64 * MIB
    assert lag and max(lag) < 0.010, f"the event loop stalled {max(lag) * 1e3:.1f} ms"


# --------------------------------------------------------------------------
# settings the pools refuse are refused at start, naming the setting


def test_settings_a_pool_refuses_are_refused_at_start() -> None:
    for var, value, name in (("VMPOOL_WAITVM_TIMEOUT", "0", "waitvm_timeout"),
                             ("VMPOOL_BACKOFF_INITIAL", "0", "backoff_initial"),
                             ("VMPOOL_CREATE_CONCURRENCY", "0", "create_concurrency"),
                             ("VMPOOL_COPYIN_TIMEOUT", "0", "copyin_timeout")):
        with pytest.raises(ConfigError, match=name):
            load_config(environ={var: value})


# --------------------------------------------------------------------------
# open answers from md5s kept at upload


async def test_open_keeps_md5s_and_notices_a_changed_file(tmp_path: Path) -> None:
    async with _running(make_config(tmp_path, sim_settings())) as s:
        await opened(s)
        for i in range(20):
            _, body = await s.post("/upload/test/lab/", f"handin {i}".encode(),
                                   headers={"Filename": f"h{i}.c"})
            assert body["statusMsg"] == "Uploaded file"
        lab = Path(s.config.courselabs) / "test-lab"
        _, body, _ = await s.get("/open/test/lab/")
        assert body["files"]["h3.c"] == hashlib.md5(b"handin 3").hexdigest()
        assert body["files"]["Makefile"] == hashlib.md5(MAKEFILE).hexdigest()
        # changed behind the server's back: its md5 is computed again
        (lab / "h3.c").write_bytes(b"changed by hand, longer")
        _, body, _ = await s.get("/open/test/lab/")
        assert body["files"]["h3.c"] == hashlib.md5(b"changed by hand, longer").hexdigest()
        assert sorted(p.name for p in lab.iterdir()) == sorted(
            ["Makefile", "output", *(f"h{i}.c" for i in range(20))])
    assert lab_md5s(lab)["h7.c"] == hashlib.md5(b"handin 7").hexdigest()



async def test_tangos_ulimit_settings_reach_the_driver(tmp_path: Path) -> None:
    settings = Settings(default_vmms="local", pool_size=0, vm_ulimit_user_proc=77,
                        vm_ulimit_file_size=5 * MIB, driver_options={"local": {
                            "state_dir": str(tmp_path / "state"), "uid_base": 64640,
                            "uid_count": 2, "nproc": 50}})
    async with Manager(settings) as mgr:
        drv = await mgr.driver("local")
    assert drv.fsize == 5 * MIB  # type: ignore[attr-defined]
    assert drv.nproc == 50  # type: ignore[attr-defined]  (the driver's own option wins)


# --------------------------------------------------------------------------
# a job-owned job's accessKey: kept for a rerun, sealed at rest


def test_access_key_is_kept_sealed_for_a_rerun_and_dropped_when_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VMPOOL_STORE_KEY", raising=False)
    db = tmp_path / "jobs.sqlite"
    store = SQLiteStore(db)
    job = stored_job(tmp_path, "owned", "owned.out")
    job.accessKeyId, job.accessKey = "AKIAEXAMPLE", "the-secret-key-1234"
    store.add(job, "test", "lab")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.sqlite*") if p.suffix != ".key")
    assert b"the-secret-key-1234" not in raw and b"AKIAEXAMPLE" in raw
    assert oct((tmp_path / "jobs.sqlite.key").stat().st_mode & 0o777) == "0o600"
    store = SQLiteStore(db)  # a restart: the rerun has the key
    (again,) = store.unfinished()
    assert again.job.accessKey == "the-secret-key-1234"
    assert "accessKey" not in json.dumps(again.job.to_dict())  # never in /jobs
    store.finish(again.job, "success", "done")
    store.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (row,) = conn.execute("SELECT job FROM jobs").fetchone()
    assert "accessKeySealed" not in row  # a done job's is dropped
    # another store key cannot open it: the key is None (the job then fails clearly)
    store = SQLiteStore(tmp_path / "other.sqlite")
    job2 = stored_job(tmp_path, "owned2", "owned2.out")
    job2.accessKeyId, job2.accessKey = "AKIAEXAMPLE", "secret-2"
    store.add(job2, "test", "lab")
    store.close()
    (tmp_path / "other.sqlite.key").write_bytes(
        (tmp_path / "jobs.sqlite.key").read_bytes())
    store = SQLiteStore(tmp_path / "other.sqlite")
    try:
        (lost,) = store.unfinished()
        assert lost.job.accessKeyId == "AKIAEXAMPLE" and lost.job.accessKey is None
    finally:
        store.close()
