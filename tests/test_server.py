"""The Tango-compatible HTTP server, over real HTTP on 127.0.0.1, route by route."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import yarl
from aiohttp import web

from vmpool import Settings
from vmpool.server import HELLO, serve
from vmpool.server.config import ConfigError, ServerConfig, load_config

from .conftest import autograder_re

MAKEFILE = b"all:\n\t@echo hello from the server test\n"


@dataclass
class Srv:
    url: str
    config: ServerConfig
    http: aiohttp.ClientSession

    async def get(self, path: str) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.get(self.url + path) as r:
            body = await r.read()
            return r.status, _decode(r, body), r

    async def post(self, path: str, data: Any = None, **kw: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, data=data, **kw) as r:
            return r.status, _decode(r, await r.read())


def _decode(r: aiohttp.ClientResponse, body: bytes) -> Any:
    if r.content_type == "application/json":
        import json

        return json.loads(body)
    return body


def make_config(tmp: Path, settings: Settings, **server: Any) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        keys=["test", "other"],
        courselabs=str(tmp / "labs"),
        database=str(tmp / "jobs.sqlite"),
        settings=settings,
        callback_backoff=0.05,
        **server,
    )


@pytest.fixture
def srv_cm(tmp_path: Path) -> _running:
    """The server for one test, entered by the test itself (a task group must be
    entered and left in one task, and a fixture's setup and teardown are not)."""
    settings = Settings(
        default_vmms="sim", pool_size=2,
        driver_options={"sim": {"images": ["img.img", "other.img"],
                                "latency": {"runJob": 0.01}}},
    )
    return _running(make_config(tmp_path, settings, max_upload_bytes=4096))


class _running:
    """The server as an async context manager: its task group and HTTP
    client on one AsyncExitStack, entered and left by the test's task."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stop = anyio.Event()

    async def __aenter__(self) -> Srv:
        self._stack = contextlib.AsyncExitStack()
        try:
            tg = await self._stack.enter_async_context(anyio.create_task_group())
            self._stack.callback(self.stop.set)  # runs first: the server stops
            port: list[int] = []
            started = anyio.Event()

            def ready(p: int) -> None:
                port.append(p)
                started.set()

            tg.start_soon(lambda: serve(self.config, ready=ready, stop=self.stop))
            with anyio.fail_after(20):
                await started.wait()
            http = await self._stack.enter_async_context(aiohttp.ClientSession())
        except BaseException:
            await self._stack.aclose()
            raise
        return Srv(f"http://127.0.0.1:{port[0]}", self.config, http)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


@contextlib.asynccontextmanager
async def local_app(app: web.Application) -> AsyncIterator[int]:
    """``app`` served on 127.0.0.1 (a callback receiver); yields its port."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def job_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": "img.img",
        "jobName": "hello",
        "output_file": "hello.out",
        "files": [{"localFile": "Makefile", "destFile": "Makefile"}],
        "timeout": 10,
    }
    body.update(over)
    return body


async def opened(s: Srv, lab: str = "lab") -> None:
    status, body, _ = await s.get(f"/open/test/{lab}/")
    assert status == 200 and body["statusId"] == 0
    status, body = await s.post(f"/upload/test/{lab}/", MAKEFILE, headers={"Filename": "Makefile"})
    assert body["statusMsg"] in ("Uploaded file", "File exists")


async def wait_output(s: Srv, lab: str, name: str) -> bytes:
    path = Path(s.config.courselabs) / f"test-{lab}" / "output" / name
    with anyio.fail_after(20):
        while True:
            _, body, r = await s.get(f"/poll/test/{lab}/{name}")
            if r.content_type == "application/octet-stream":
                assert path.read_bytes() == body
                return bytes(body)
            assert body == {"statusId": -1, "statusMsg": "Output file not found"}
            await anyio.sleep(0.02)  # ok-sleep: polling is what Autolab does; bounded


async def test_hello_and_both_slash_forms(srv_cm: _running) -> None:
    async with srv_cm as srv:
        status, body, _ = await srv.get("/")
        assert status == 200 and body == HELLO.encode()
        for path in ("/open/test/lab", "/open/test/lab/", "/info/test", "/info/test/",
                     "/pool/test", "/pool/test/", "/jobs/test/0", "/jobs/test/0/"):
            status, body, _ = await srv.get(path)
            assert status == 200 and body["statusId"] == 0, (path, body)


async def test_wrong_key_touches_nothing(srv_cm: _running) -> None:
    async with srv_cm as srv:
        labs = Path(srv.config.courselabs)
        before = sorted(labs.iterdir())
        for method, path in (
            ("GET", "/open/nope/lab/"), ("POST", "/upload/nope/lab/"),
            ("POST", "/addJob/nope/lab/"),
            ("GET", "/poll/nope/lab/x/"), ("GET", "/getPartialOutput/nope/1/"),
            ("GET", "/info/nope/"), ("GET", "/jobs/nope/0/"), ("GET", "/pool/nope/"),
            ("GET", "/pool/nope/img.img/"), ("GET", "/prealloc/nope/img.img/2/"),
            ("POST", "/prealloc/nope/img.img/2/"),
        ):
            async with srv.http.request(method, srv.url + path, data=b"x",
                                        headers={"Filename": "f"}) as r:
                assert r.status == 200
                assert await r.json() == {"statusId": -1, "statusMsg": "Key not recognized"}
        assert sorted(labs.iterdir()) == before
        assert srv.config.settings  # the pools were not touched:
        _, body, _ = await srv.get("/pool/test/")
        assert body["pools"] == {}


async def test_open_and_upload(srv_cm: _running) -> None:
    async with srv_cm as srv:
        _, body, _ = await srv.get("/open/test/lab/")
        assert body == {"statusId": 0, "statusMsg": "Created directory", "files": {}}
        _, body = await srv.post("/upload/test/lab/", MAKEFILE, headers={"Filename": "Makefile"})
        assert body == {"statusId": 0, "statusMsg": "Uploaded file"}
        _, body = await srv.post("/upload/test/lab", MAKEFILE, headers={"Filename": "Makefile"})
        assert body == {"statusId": 0, "statusMsg": "File exists"}
        _, body, _ = await srv.get("/open/test/lab")
        assert body == {"statusId": 0, "statusMsg": "Found directory",
                        "files": {"Makefile": hashlib.md5(MAKEFILE).hexdigest()}}
        _, body = await srv.post("/upload/test/lab/", b"changed", headers={"Filename": "Makefile"})
        assert body["statusMsg"] == "Uploaded file"
        lab = Path(srv.config.courselabs) / "test-lab"
        assert (lab / "Makefile").read_bytes() == b"changed"
        # not opened
        _, body = await srv.post("/upload/test/never/", MAKEFILE, headers={"Filename": "a"})
        assert body == {"statusId": -1, "statusMsg": "Courselab not found"}
        # bad names: nothing written anywhere
        for name, why in (("../evil", "contains a '/'"), ("a/b", "contains a '/'"),
                          ("..", "is not allowed"), ("", "file name is empty")):
            _, body = await srv.post("/upload/test/lab/", b"x", headers={"Filename": name})
            assert body["statusId"] == -1 and why in body["statusMsg"], (name, body)
        _, body = await srv.post("/upload/test/lab/", b"x")
        assert body == {"statusId": -1, "statusMsg": "Invalid file name: file name is empty"}
        # size limit (4096 in this fixture), streamed and refused
        _, body = await srv.post("/upload/test/lab/", b"y" * 5000, headers={"Filename": "big"})
        assert body["statusId"] == -1 and "File too large" in body["statusMsg"]
        assert sorted(p.name for p in lab.iterdir()) == ["Makefile", "output"]
        assert not (Path(srv.config.courselabs) / "evil").exists()


async def test_add_job_and_poll(srv_cm: _running) -> None:
    async with srv_cm as srv:
        await opened(srv)
        _, body = await srv.post("/addJob/test/lab/", json=job_body(max_kb=1))
        assert body == {"statusId": 0, "statusMsg": "Job added", "jobId": "1"}
        out = (await wait_output(srv, "lab", "hello.out")).decode().splitlines()
        assert re.fullmatch(autograder_re("Received job hello:1"), out[0])
        assert re.fullmatch(autograder_re("Success: Autodriver returned normally"), out[1])
        assert out[3:5] == ["---", "Autodriver: Job exited with status 0"]
        _, body = await srv.post("/addJob/test/lab", json=job_body(jobName="two",
                                                                   output_file="two.out"))
        assert body["jobId"] == "2"
        await wait_output(srv, "lab", "two.out")
        _, body, _ = await srv.get("/jobs/test/1/")
        assert [j["id"] for j in body["jobs"]] == [1, 2]
        assert body["jobs"][0]["maxOutputFileSize"] == 1024
        assert set(body["jobs"][0]) >= {
            "id", "name", "outputFile", "notifyURL", "maxOutputFileSize", "assigned", "timeout",
            "retries", "trace", "vm", "input"}
        _, body, _ = await srv.get("/info/test/")
        info = body["info"]
        assert body["statusMsg"] == "Found info successfully"
        assert info["job_requests"] == 2 and set(info) >= {
            "elapsed_secs", "job_requests", "job_retries", "waitvm_timeouts", "runjob_timeouts",
            "copyin_errors", "runjob_errors", "copyout_errors", "num_threads"}
        _, body, _ = await srv.get("/poll/test/lab/missing.out/")
        assert body == {"statusId": -1, "statusMsg": "Output file not found"}


async def test_add_job_names_every_problem(srv_cm: _running) -> None:
    async with srv_cm as srv:
        await opened(srv)
        _, body = await srv.post("/addJob/test/lab/", json={
            "jobName": "", "files": [{"localFile": "nothere", "destFile": "x"}],
            "timeout": -1, "max_kb": "big", "disable_network": "yes", "cores": 0,
            "callback_url": "ftp://x"})
        msg = body["statusMsg"]
        assert body["statusId"] == -1 and msg.startswith("Invalid job: ")
        for problem in ("missing field 'image'", "missing field 'output_file'",
                        "'jobName' must be a non-empty string",
                        "input file nothere was not uploaded",
                        "no file has destFile 'Makefile'", "'timeout' must be a number >= 0",
                        "'max_kb' must be an integer >= 0",
                        "'cores' must be a positive integer", "'callback_url' must be an http"):
            assert problem in msg, problem
        _, body = await srv.post("/addJob/test/lab/", data=b"{not json")
        assert body["statusId"] == -1 and "not JSON" in body["statusMsg"]
        _, body = await srv.post("/addJob/test/lab/", json=job_body(image="nope.img"))
        assert body == {"statusId": -1, "statusMsg": "Invalid image name"}
        _, body = await srv.post("/addJob/test/lab/", json=job_body(image="nope.img",
                                                                   timeout="x"))
        assert body["statusId"] == -1
        assert "unknown image 'nope.img'" in body["statusMsg"]
        assert "'timeout' must be a number" in body["statusMsg"]
        _, body = await srv.post("/addJob/test/lab/", json=job_body(
            files=[{"localFile": "Makefile", "destFile": "../../etc/x"}]))
        assert body["statusId"] == -1 and "contains '..'" in body["statusMsg"]
        _, body = await srv.post("/addJob/test/lab/", json=job_body(output_file="../x"))
        assert body["statusId"] == -1 and "'output_file'" in body["statusMsg"]
        _, body = await srv.post("/addJob/test/never/", json=job_body())
        assert body == {"statusId": -1, "statusMsg": "Courselab not found"}
        _, body, _ = await srv.get("/info/test/")
        assert body["info"]["job_requests"] == 0


async def test_pool_and_prealloc(srv_cm: _running) -> None:
    async with srv_cm as srv:
        _, body, _ = await srv.get("/pool/test/img.img/")
        assert body == {"statusId": -1, "statusMsg": "Pool not found"}
        _, body = await srv.post("/prealloc/test/img.img/3/")
        assert body == {"statusId": 0, "statusMsg": "VMs preallocated"}
        _, body, _ = await srv.get("/prealloc/test/other.img/2")
        assert body == {"statusId": 0, "statusMsg": "VMs preallocated"}
        _, body = await srv.post("/prealloc/test/img.img/4/", json={"cores": 2, "memory": 512})
        assert body["statusMsg"] == "VMs preallocated"
        _, body = await srv.post("/prealloc/test/img.img/x/")
        assert body == {"statusId": -1, "statusMsg": "Invalid prealloc size"}
        _, body = await srv.post("/prealloc/test/img.img/-1/")
        assert body == {"statusId": -1, "statusMsg": "Invalid prealloc size"}
        _, body = await srv.post("/prealloc/test/nope.img/2/")
        assert body == {"statusId": -1, "statusMsg": "Invalid image name"}
        _, body = await srv.post("/prealloc/test/img.img/2/", data=b"[1,2]")
        assert body["statusId"] == -1 and body["statusMsg"].startswith("Preallocate VM failed")
        # the sizes are SET, not added, and the VMs are made in the background;
        # with cores/memory, prealloc sizes the image's pool with VMs of that
        # spec (Tango's way): the plain VMs made before are drained
        with anyio.fail_after(10):
            while True:
                _, body, _ = await srv.get("/pool/test/img.img/")
                pools = body["pools"]
                if pools.get("img", {}).get("total", [None]) == [] and len(
                    pools.get("img[cores=2,memory=512]", {}).get("free", [])) == 4:
                    break
                await anyio.sleep(0.02)  # ok-sleep: watching a background fill over HTTP; bounded
        assert body["statusMsg"] == "Found pool"
        _, body, _ = await srv.get("/pool/test/")
        assert body["statusMsg"] == "Found all pools"
        assert set(body["pools"]) == {"img", "other", "img[cores=2,memory=512]"}
        assert len(body["pools"]["other"]["total"]) == 2
        # a job naming no spec runs on the preallocated VMs
        await opened(srv)
        _, body = await srv.post("/addJob/test/lab/", json=job_body())
        assert body["statusId"] == 0, body
        out = (await wait_output(srv, "lab", "hello.out")).decode()
        assert "Success: Autodriver returned normally" in out
        _, body, _ = await srv.get("/pool/test/img.img/")
        assert len(body["pools"]["img[cores=2,memory=512]"]["total"]) == 4  # its VM replaced


async def test_partial_output_and_metrics(srv_cm: _running) -> None:
    async with srv_cm as srv:
        _, body, _ = await srv.get("/getPartialOutput/test/99/")
        assert body["statusId"] == -1
        _, body, _ = await srv.get("/getPartialOutput/test/x/")
        assert body == {"statusId": -1, "statusMsg": "Invalid job id"}
        await opened(srv)
        _, body = await srv.post("/addJob/test/lab/", json=job_body())
        await wait_output(srv, "lab", "hello.out")
        _, body, _ = await srv.get("/getPartialOutput/test/1/")
        assert body["statusMsg"] == "Partial output obtained"
        assert "Autodriver: Job exited with status 0" in body["output"]
        status, text, r = await srv.get("/metrics")
        assert status == 200 and r.content_type == "text/plain"
        lines = text.decode().splitlines()
        assert "vmpool_jobs_total 1" in lines
        assert 'vmpool_job_outcomes_total{outcome="success"} 1' in lines
        assert any(line.startswith('vmpool_vms_free{pool="img"}') for line in lines)
        assert 'vmpool_queue_wait_seconds_count{pool="img"} 1' in lines
        for step in ("waitvm", "copyin", "runjob", "copyout"):
            assert f'vmpool_step_seconds_count{{step="{step}"}} 1' in lines
        assert 'vmpool_job_seconds_bucket{outcome="success",le="+Inf"} 1' in lines
        assert "# TYPE vmpool_step_seconds histogram" in lines


async def test_callback_arrives(tmp_path: Path) -> None:
    received: list[tuple[str | None, bytes, str | None]] = []
    got = anyio.Event()
    failing_hits: list[int] = []

    async def catch(request: web.Request) -> web.Response:
        form = await request.post()
        f = form["file"]
        assert isinstance(f, web.FileField)
        received.append((request.headers.get("Filename"), f.file.read(), f.filename))
        got.set()
        return web.Response(text="ok")

    async def broken(request: web.Request) -> web.Response:
        failing_hits.append(1)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/cb", catch)
    app.router.add_post("/broken", broken)
    settings = Settings(default_vmms="sim", pool_size=1)
    async with (
        local_app(app) as port,
        _running(make_config(tmp_path, settings, callback_tries=3)) as s,
    ):
        await opened(s)
        _, body = await s.post("/addJob/test/lab/", json=job_body(
            callback_url=f"http://127.0.0.1:{port}/cb"))
        assert body["statusMsg"] == "Job added"
        _, body = await s.post("/addJob/test/lab/", json=job_body(
            jobName="b", output_file="b.out", notifyURL=f"http://127.0.0.1:{port}/broken"))
        with anyio.fail_after(10):
            await got.wait()
        out = await wait_output(s, "lab", "hello.out")
        assert received == [("hello.out", out, "hello.out")]
        with anyio.fail_after(10):
            while True:
                _, body, _ = await s.get("/info/test/")
                if body["info"]["callbacks_failed"] == 1:
                    break
                await anyio.sleep(0.02)  # ok-sleep: a retried callback gives up; bounded
        assert len(failing_hits) == 3 and body["info"]["callbacks_sent"] == 1


async def test_full_cycle_on_the_local_driver(tmp_path: Path) -> None:
    settings = Settings(default_vmms="local", pool_size=1, driver_options={"local": {
        "state_dir": str(tmp_path / "state"), "uid_base": 64500, "uid_count": 20,
        "owner": "test-server"}})
    async with _running(make_config(tmp_path, settings)) as s:
        _, body, _ = await s.get("/open/test/lab/")
        assert body["statusMsg"] == "Created directory"
        _, body = await s.post("/upload/test/lab/", MAKEFILE, headers={"Filename": "Makefile"})
        assert body["statusMsg"] == "Uploaded file"
        _, body = await s.post("/addJob/test/lab/", json=job_body(image="default",
                                                                  disable_network=True))
        assert body == {"statusId": 0, "statusMsg": "Job added", "jobId": "1"}
        out = (await wait_output(s, "lab", "hello.out")).decode().splitlines()
        assert re.fullmatch(autograder_re("Success: Autodriver returned normally"), out[1])
        assert out[3:] == ["---", "Autodriver: Job exited with status 0",
                           "hello from the server test"]
    owner_dir = tmp_path / "state" / "test-server"  # (removed with its last sandbox)
    assert not owner_dir.exists() or not any(owner_dir.iterdir())


def test_config_file_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "vmpool.toml"
    cfg.write_text('[server]\nport = 3001\nkeys = ["k1"]\n[vmpool]\npool_size = 5\n'
                   '[drivers.local]\nmemory_mb = 512\n')
    c = load_config(str(cfg), environ={})
    assert c.port == 3001 and c.keys == ["k1"] and c.settings.pool_size == 5
    assert c.settings.driver_options["local"] == {"memory_mb": 512}
    c = load_config(str(cfg), environ={"RESTFUL_KEY": "envkey", "VMPOOL_PORT": "4000",
                                       "VMPOOL_JOB_RETRIES": "3"})
    assert c.keys == ["envkey"] and c.port == 4000 and c.settings.job_retries == 3
    d = load_config(None, environ={})
    assert (d.port, d.keys, d.settings.job_retries, d.settings.waitvm_timeout) == (
        3000, ["test"], 2, 60.0)
    for text, msg in (
        ("[server]\nport = 99999\n", "server.port must be within 0..65535"),
        ("[server]\nfoo = 1\n", "unknown [server] setting(s): foo"),
        ("[vmpool]\npool_sise = 1\n", "unknown [vmpool] setting(s): pool_sise"),
        ("[vmpool]\nwaitvm_timeout = -5\n", "waitvm_timeout must be >= 0"),
        ("[sever]\n", "unknown section(s)"),
        ('[server]\ncallback_ca_file = "/nonexistent.pem"\n', "server.callback_ca_file"),
        ("[server]\nmax_output_kb = 0\n", "server.max_output_kb must be > 0"),
        ("not toml [", "is not valid TOML"),
    ):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_config(str(cfg), environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.toml"), environ={})


async def test_partial_output_of_a_running_job(tmp_path: Path) -> None:
    settings = Settings(default_vmms="local", pool_size=1, driver_options={"local": {
        "state_dir": str(tmp_path / "state"), "uid_base": 64540, "uid_count": 10,
        "owner": "test-partial"}})
    async with _running(make_config(tmp_path, settings)) as s:
        await s.get("/open/test/lab/")
        slow = (b"all:\n\t@echo first line\n\t@while [ ! -e release ]; do sleep 0.05; done\n"
                b"\t@echo last line\n")
        await s.post("/upload/test/lab/", slow, headers={"Filename": "Makefile"})
        _, body = await s.post("/addJob/test/lab/", json=job_body(image="default", timeout=20))
        job_id = body["jobId"]
        # the job holds until released: its first line must show while it runs
        with anyio.fail_after(15):
            while True:
                _, body, _ = await s.get(f"/getPartialOutput/test/{job_id}/")
                assert body["statusMsg"] == "Partial output obtained"
                if body["output"] == "first line\n":
                    break
                await anyio.sleep(0.05)  # ok-sleep: watching a running job over HTTP; bounded
        _, body, _ = await s.get("/poll/test/lab/hello.out")
        assert body == {"statusId": -1, "statusMsg": "Output file not found"}
        # release it: the job dir is the sandbox's; the grader's file is created there
        state = tmp_path / "state" / "test-partial"
        (job_dir,) = [d / "fs" / "job" for d in state.iterdir()]
        (job_dir / "release").write_text("")
        out = (await wait_output(s, "lab", "hello.out")).decode().splitlines()
        assert out[-3:] == ["Autodriver: Job exited with status 0", "first line", "last line"]


# --------------------------------------------------------------------------
# Issue 9: the server never goes down, never loses a job; Tango's and
# Autolab's exact behaviour


@dataclass
class Received:
    filename_header: str | None
    body: bytes
    file_name: str | None
    path_qs: str


class CallbackListener:
    """An aiohttp listener on 127.0.0.1 taking callbacks as Autolab's Rails
    does: the multipart field ``file`` must be an upload (a part with a
    filename), which ``params[:file].read`` reads."""

    def __init__(self, ssl_context: Any = None, port: int = 0) -> None:
        self.got: list[Received] = []
        self.arrived = anyio.Event()
        self.ssl_context = ssl_context
        self.port = port

    async def _catch(self, request: web.Request) -> web.Response:
        form = await request.post()
        f = form["file"]
        assert isinstance(f, web.FileField), "the file field must be an upload"
        self.got.append(Received(request.headers.get("Filename"), f.file.read(), f.filename,
                                 request.path_qs))
        self.arrived.set()
        return web.Response(status=204)

    async def __aenter__(self) -> CallbackListener:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._catch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def url(self, path: str = "/cb") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"


async def info(s: Srv) -> dict[str, Any]:
    _, body, _ = await s.get("/info/test/")
    result: dict[str, Any] = body["info"]
    return result


async def wait_info(s: Srv, key: str, value: int) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            i = await info(s)
            if i.get(key) == value:
                return i
            await anyio.sleep(0.02)  # ok-sleep: watching a background count over HTTP; bounded


def sim_settings(**sim: Any) -> Settings:
    return Settings(default_vmms="sim", pool_size=1, driver_options={"sim": {
        "images": ["img.img", "other.img"], "latency": {"runJob": 0.01}, **sim}})


async def test_control_characters_in_names_are_refused(srv_cm: _running) -> None:
    async with srv_cm as srv:
        await opened(srv)
        _, body = await srv.post("/upload/test/lab/", b"x", headers={"Filename": "a\tb"})
        assert body["statusId"] == -1 and "control character" in body["statusMsg"], body
        for over, where in (
            ({"output_file": "a\nb.out"}, "'output_file'"),
            ({"output_file": "a\x7fb.out"}, "'output_file'"),
            ({"files": [{"localFile": "Make\x01file", "destFile": "Makefile"}]},
             "files[0].localFile"),
            ({"files": [{"localFile": "Makefile", "destFile": "Makefile"},
                        {"localFile": "Makefile", "destFile": "x\x1b[2J"}]}, "files[1]"),
            ({"image": "img\n.img"}, "image name"),
        ):
            _, body = await srv.post("/addJob/test/lab/", json=job_body(**over))
            msg = body["statusMsg"]
            assert body["statusId"] == -1 and where in msg and "control character" in msg, \
                (over, body)
        _, body, _ = await srv.get("/prealloc/test/img%0A.img/1/")
        assert body == {"statusId": -1, "statusMsg": "Invalid image name"}
        assert (await info(srv))["job_requests"] == 0


def seed_finished_job(config: ServerConfig, output_name: str, url: str) -> int:
    """A job stored (as an earlier vmpool, or any path, could have stored it)
    whose output is complete and whose callback is pending."""
    from vmpool.models import InputFile, TangoJob, TangoMachine
    from vmpool.output import HERE_IS_OUTPUT, autograder_line
    from vmpool.server.store import SQLiteStore

    lab = Path(config.courselabs) / "test-lab"
    (lab / "output").mkdir(parents=True, exist_ok=True)
    (lab / "Makefile").write_bytes(MAKEFILE)
    store = SQLiteStore(config.database)
    try:
        job = TangoJob(vm=TangoMachine(name="img", image="img.img"),
                       outputFile=str(lab / "output" / output_name), name="poison",
                       input=[InputFile(str(lab / "Makefile"), "Makefile")], notifyURL=url)
        job_id = store.add(job, "test", "lab")
        Path(job.outputFile).write_text(
            autograder_line(f"Received job poison:{job_id}")
            + autograder_line("Success: Autodriver returned normally")
            + autograder_line(HERE_IS_OUTPUT) + "Autodriver: Job exited with status 0\n")
        return job_id
    finally:
        store.close()


async def test_a_callback_whose_name_no_header_takes_is_sent_and_never_ends_the_server(
        tmp_path: Path) -> None:
    """aiohttp refuses the header ``Filename: a\\nb``: the ValueError escaped the
    callback task and ended the server, at every start (the callback was
    resent). The name is now percent-encoded in the header."""
    async with CallbackListener() as cb:
        config = make_config(tmp_path, sim_settings())
        seed_finished_job(config, "a\nb.out", cb.url("/cb?dave=X&submission_id=1"))
        async with _running(config) as s:
            with anyio.fail_after(20):
                await cb.arrived.wait()
            status, body, _ = await s.get("/")
            assert status == 200 and body == HELLO.encode()
            i = await wait_info(s, "callbacks_sent", 1)
            assert i["callback_errors"] == 0
        (got,) = cb.got
        assert got.filename_header == "a%0Ab.out"
        assert got.body.startswith(b"Autograder [") and got.path_qs.endswith("submission_id=1")
        cb.got.clear()
        # the next start is fine and sends nothing again
        async with _running(config) as s:
            status, _, _ = await s.get("/")
            assert status == 200
            assert (await info(s))["callbacks_sent"] == 0
        assert cb.got == []


async def test_an_exception_in_a_callback_is_caught_counted_and_the_callback_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kw: Any) -> None:
        raise RuntimeError("injected: a bug in building the callback")

    async with CallbackListener() as cb:
        config = make_config(tmp_path, sim_settings())
        job_id = seed_finished_job(config, "out.txt", cb.url())
        with monkeypatch.context() as m:
            m.setattr(aiohttp.FormData, "add_field", broken)
            async with _running(config) as s:
                i = await wait_info(s, "callback_errors", 1)
                assert i["callbacks_sent"] == 0
                status, _, _ = await s.get("/")
                assert status == 200
                _, text, _ = await s.get("/metrics")
                assert 'vmpool_callbacks_total{result="error"} 1' in text.decode().splitlines()
        logged = [r for r in caplog.records if r.name == "vmpool.server"
                  and r.levelname == "ERROR" and "injected" in r.getMessage()]
        assert len(logged) == 1 and f"job {job_id}" in logged[0].getMessage()
        # marked done: the next start does not send it again (and could not fail again)
        async with _running(config) as s:
            assert (await info(s))["callback_errors"] == 0
            status, _, _ = await s.get("/")
            assert status == 200
        assert cb.got == []


def test_callback_retries_outlast_tangos() -> None:
    """Tango's worker.notifyServer: urllib3 Retry(total=10, backoff_factor=1),
    backoff capped at 120 s: 11 tries, pauses 0, 2, 4, ... 64, 120, 120, 120
    (486 s). vmpool's defaults must last at least as long."""
    from vmpool.server.callbacks import callback_delays

    cfg = ServerConfig()
    delays = callback_delays(cfg)
    assert cfg.callback_tries >= 11 and len(delays) == cfg.callback_tries - 1
    assert sum(delays) >= 486 and max(delays) <= cfg.callback_backoff_max
    assert cfg.callback_verify_tls is True and cfg.callback_ca_file is None


async def test_a_callback_reaches_an_autolab_that_was_down_for_five_tries(
        tmp_path: Path) -> None:
    """The default number of tries (only the pauses shortened): Autolab comes
    back after the fifth failed try and still gets the grade."""
    import socket

    with socket.socket() as sock:  # a port with nothing on it, for now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fifth = anyio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "(try 5/" in record.getMessage():
                fifth.set()

    watch = Watch()
    logging.getLogger("vmpool.server").addHandler(watch)
    try:
        async with _running(make_config(tmp_path, sim_settings())) as s:
            await opened(s)
            _, body = await s.post("/addJob/test/lab/", json=job_body(
                callback_url=f"http://127.0.0.1:{port}/cb"))
            assert body["statusMsg"] == "Job added"
            with anyio.fail_after(20):
                await fifth.wait()
            async with CallbackListener(port=port) as cb:
                with anyio.fail_after(30):
                    await cb.arrived.wait()
                assert cb.got[0].filename_header == "hello.out"
                await wait_info(s, "callbacks_sent", 1)
    finally:
        logging.getLogger("vmpool.server").removeHandler(watch)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        # .ci/run installs it: in CI its absence is a failure, never a skip
        import os

        if os.environ.get("CI"):
            pytest.fail("needs the openssl command (.ci/run installs it)")
        pytest.skip("needs the openssl command")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_callbacks_verify_tls_with_a_ca_file_or_an_explicit_opt_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    async with CallbackListener(ssl_context=ctx) as cb:
        # verified by default: a self-signed certificate is refused, once
        # explained with the options' names, counted, not retried
        async with _running(make_config(tmp_path / "a", sim_settings())) as s:
            await opened(s)
            for name in ("one.out", "two.out"):
                await s.post("/addJob/test/lab/", json=job_body(
                    output_file=name, callback_url=cb.url()))
            i = await wait_info(s, "callbacks_tls_refused", 2)
            assert i["callbacks_sent"] == 0 and i["callbacks_failed"] == 0
        hints = [r.getMessage() for r in caplog.records if "refused for TLS" in r.getMessage()]
        assert len(hints) == 2
        assert sum("callback_ca_file" in h and "callback_verify_tls = false" in h
                   for h in hints) == 1
        assert cb.got == []
        for i, over in enumerate(({"callback_ca_file": str(cert)},
                                  {"callback_verify_tls": False})):
            async with _running(make_config(tmp_path / f"b{i}", sim_settings(), **over)) as s:
                await opened(s)
                await s.post("/addJob/test/lab/", json=job_body(callback_url=cb.url()))
                await wait_info(s, "callbacks_sent", 1)
        assert len(cb.got) == 2


async def test_job_fields_as_tango_and_autolab_read_them(tmp_path: Path) -> None:
    """tango-cli sends ``max_kb: 0`` by default; Autolab sends
    ``disable_network`` as its database column (null); Autolab's jobs page
    marks a finished job Failed when its last trace line contains "Error"."""
    config = make_config(tmp_path, sim_settings(latency={"runJob": 0.3}))
    async with _running(config) as s:
        await opened(s)
        for n, over in enumerate(({"max_kb": 0, "disable_network": None},
                                  {"max_kb": 10**9, "disable_network": "yes"},
                                  {"jobName": "ErrorCorrection_lab_1_Error@example.com"})):
            _, body = await s.post("/addJob/test/lab/", json=job_body(
                output_file=f"{n}.out", **over))
            assert body == {"statusId": 0, "statusMsg": "Job added", "jobId": str(n + 1)}
        # running: assigned, with the VM it runs on
        with anyio.fail_after(20):
            while True:
                _, body, _ = await s.get("/jobs/test/0/")
                running = [j for j in body["jobs"] if j["assigned"]]
                if running:
                    break
                await anyio.sleep(0.02)  # ok-sleep: watching a job start over HTTP; bounded
        assert isinstance(running[0]["vm"]["id"], int)
        for n in range(3):
            await wait_output(s, "lab", f"{n}.out")
        _, body, _ = await s.get("/jobs/test/1/")
        jobs = {j["id"]: j for j in body["jobs"]}
        assert [jobs[i]["maxOutputFileSize"] for i in (1, 2, 3)] == [
            1000 * 1024, config.max_output_kb * 1024, 1000 * 1024]
        for j in jobs.values():
            assert j["timeout"] == 10 and type(j["timeout"]) is int
            assert j["assigned"] is False and isinstance(j["vm"]["id"], int)
            last = j["trace"][-1]
            assert re.fullmatch(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}"
                                r"\|Success: Autodriver returned normally", last), last
            assert "Error" not in last.split("|")[1]  # Autolab: Completed, not Failed


async def test_a_key_sees_only_its_own_jobs(tmp_path: Path) -> None:
    config = make_config(tmp_path, sim_settings(latency={"runJob": 0.3}))
    async with _running(config) as s:
        await opened(s)
        _, body = await s.post("/addJob/test/lab/", json=job_body())
        job_id = body["jobId"]
        _, body, _ = await s.get("/jobs/other/0/")
        assert body["jobs"] == []
        _, body, _ = await s.get(f"/getPartialOutput/other/{job_id}/")
        assert body == {"statusId": -1, "statusMsg": "Job not found"}
        _, body, _ = await s.get("/jobs/test/0/")
        assert [j["id"] for j in body["jobs"]] == [int(job_id)]
        await wait_output(s, "lab", "hello.out")
        _, body, _ = await s.get("/jobs/other/1/")
        assert body["jobs"] == []
        _, body, _ = await s.get(f"/getPartialOutput/other/{job_id}/")
        assert body == {"statusId": -1, "statusMsg": "Job not found"}
        _, body, _ = await s.get("/jobs/test/1/")
        assert [j["id"] for j in body["jobs"]] == [int(job_id)]
        _, body, _ = await s.get(f"/getPartialOutput/test/{job_id}/")
        assert body["statusMsg"] == "Partial output obtained"


async def test_pool_names_stay_distinct_and_metrics_labels_are_escaped(tmp_path: Path) -> None:
    from vmpool.models import pool_name

    assert pool_name("autograding_image.img") == "autograding_image"
    assert pool_name("rhel.img") == "rhel"
    assert pool_name("grader:1.1") != pool_name("grader:1.2")
    weird = 'we"ird\\name.img'
    settings = Settings(default_vmms="sim", pool_size=1, driver_options={"sim": {
        "images": ["grader:1.1", "grader:1.2", weird]}})
    async with _running(make_config(tmp_path, settings)) as s:
        for quoted in ("grader:1.1", "grader:1.2", "we%22ird%5Cname.img"):
            async with s.http.get(yarl.URL(f"{s.url}/prealloc/test/{quoted}/1/", encoded=True)) \
                    as r:
                assert (await r.json())["statusMsg"] == "VMs preallocated"
        with anyio.fail_after(10):
            while True:
                _, body, _ = await s.get("/pool/test/")
                if len(body["pools"]) == 3 and all(p["free"] for p in body["pools"].values()):
                    break
                await anyio.sleep(0.02)  # ok-sleep: watching a background fill; bounded
        assert set(body["pools"]) == {"grader:1.1", "grader:1.2", 'we"ird\\name'}
        _, text, _ = await s.get("/metrics")
        lines = text.decode().splitlines()
        assert 'vmpool_vms_free{pool="we\\"ird\\\\name"} 1' in lines
        # every sample line is well formed in Prometheus' text format
        label = r'[a-z_]+="(?:[^"\\\n]|\\["\\n])*"'
        sample = re.compile(rf"vmpool_[a-z_]+(?:\{{{label}(?:,{label})*\}})? [-+.\deE]+")
        for line in lines:
            assert line.startswith("#") or sample.fullmatch(line), line


def test_serve_takes_host_on_the_command_line(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    cfg = tmp_path / "vmpool.toml"
    cfg.write_text(
        f'[server]\nport = 0\nkeys = ["test"]\ncourselabs = "{tmp_path / "labs"}"\n'
        f'database = "{tmp_path / "jobs.sqlite"}"\n[vmpool]\ndefault_vmms = "sim"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VMPOOL_") and k != "RESTFUL_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmpool.cli", "serve", "--config", str(cfg),
         "--host", "127.0.0.2"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:  # bounded: the process ends (and stderr closes) on error
            m = re.search(r"on http://127\.0\.0\.2:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None, f"vmpool serve exited with {proc.wait(10)}"
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/", timeout=10) as r:
            assert r.read() == HELLO.encode()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
