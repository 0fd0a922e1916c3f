"""The Tango-compatible HTTP server, over real HTTP on 127.0.0.1, route by route."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
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
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stop = anyio.Event()

    async def __aenter__(self) -> Srv:
        self.tg = anyio.create_task_group()
        await self.tg.__aenter__()
        port: list[int] = []
        started = anyio.Event()

        def ready(p: int) -> None:
            port.append(p)
            started.set()

        self.tg.start_soon(lambda: serve(self.config, ready=ready, stop=self.stop))
        with anyio.fail_after(20):
            await started.wait()
        self.http = aiohttp.ClientSession()
        return Srv(f"http://127.0.0.1:{port[0]}", self.config, self.http)

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        self.stop.set()
        await self.tg.__aexit__(None, None, None)


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
                        "'max_kb' must be a positive integer", "'disable_network' must be true",
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
        # the sizes are SET, not added, and the VMs are made in the background
        with anyio.fail_after(10):
            while True:
                _, body, _ = await srv.get("/pool/test/img.img/")
                pools = body["pools"]
                if len(pools.get("img", {}).get("free", [])) == 3 and len(
                    pools.get("img[cores=2,memory=512]", {}).get("free", [])) == 4:
                    break
                await anyio.sleep(0.02)  # ok-sleep: watching a background fill over HTTP; bounded
        assert body["statusMsg"] == "Found pool"
        _, body, _ = await srv.get("/pool/test/")
        assert body["statusMsg"] == "Found all pools"
        assert set(body["pools"]) == {"img", "other", "img[cores=2,memory=512]"}
        assert len(body["pools"]["img"]["total"]) == 3


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
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = Settings(default_vmms="sim", pool_size=1)
    try:
        async with _running(make_config(tmp_path, settings, callback_tries=3)) as s:
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
    finally:
        await runner.cleanup()


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
    assert not any((tmp_path / "state" / "test-server").iterdir())


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
