"""Tango's two clients, tango-cli and Autolab, against vmpool's server.

Neither client's code is in this project (nor can it be: another project's
code is not committed here, and CI reaches no network beyond the package
registries, where neither is published). So each test sends exactly the HTTP
requests the client sends (URLs, methods, headers, bodies, defaults) and
reads the answers the way the client reads them, as their sources say:

- ``clients/tango-cli.py`` in autolab/Tango (master): ``tango_open``,
  ``tango_upload``, ``tango_addJob``, ``tango_poll``, ``tango_info``,
  ``tango_jobs``, ``tango_pool``, ``tango_prealloc``, the ``file_to_dict`` of
  ``--runJob``, and the reachability check (``GET /``, ``raise_for_status``)
  before any command. It uses ``requests``: ``data=`` a ``str`` (no
  Content-Type), ``headers={"Filename": name}`` for uploads, the argparse
  defaults ``--maxsize 0``, ``--timeout 0``, ``--outputFile result.out``,
  ``--jobname test_job``, ``--image ""``, ``--accessKeyId ""``,
  ``--accessKey ""``, ``--vmms localDocker``, ``--cores 1``, ``--memory 512``,
  ``--num 2``.
- Autolab's ``lib/tango_client.rb`` (HTTParty: ``open`` and ``jobs`` with a
  trailing slash, ``poll`` without, upload header ``filename`` lowercase, a
  string body, so Net::HTTP's default Content-Type
  ``application/x-www-form-urlencoded``), ``app/helpers/
  assessment_autograde_core.rb`` (``tango_add_job``: the body is exactly
  ``image, files[{localFile, destFile}], output_file, timeout, callback_url,
  jobName, disable_network``; ``get_output_file``, ``get_job_name``,
  ``get_callback_url``, ``tango_poll`` with ``URI.encode``, ``jobId.to_i``,
  ``get_job_status``), ``app/controllers/assessment_autograde.rb``
  (``autograde_done`` reads ``params[:file].read``: a multipart upload) and
  ``app/controllers/jobs_controller.rb`` (``formatRawJob``: Failed when the
  last trace line contains "Error"; ``vm.id``, ``vm.name``; live jobs'
  elapsed time uses ``info["timezone_offset"]``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import anyio
import pytest

from vmpool import Settings

from .test_server import CallbackListener, Srv, _running, make_config

# what requests sends on every call (requests.utils.default_headers)
REQUESTS_HEADERS = {"User-Agent": "python-requests/2.32.3", "Accept-Encoding": "gzip, deflate",
                    "Accept": "*/*", "Connection": "keep-alive"}
NO_AUTO = frozenset({"Content-Type"})


class TangoCli:
    """tango-cli's requests, one method per command."""

    def __init__(self, s: Srv, key: str, courselab: str) -> None:
        self.s, self.key, self.lab = s, key, courselab

    async def _get(self, path: str) -> aiohttp.ClientResponse:
        r = await self.s.http.get(self.s.url + path, headers=REQUESTS_HEADERS)
        await r.read()
        return r

    async def _post(self, path: str, data: str, headers: dict[str, str] | None = None
                    ) -> aiohttp.ClientResponse:
        # requests: a str body is sent as is (latin-1), with no Content-Type
        r = await self.s.http.post(self.s.url + path, data=data.encode("latin-1"),
                                   headers={**REQUESTS_HEADERS, **(headers or {})},
                                   skip_auto_headers=NO_AUTO)
        await r.read()
        return r

    async def reachable(self) -> None:
        r = await self._get("/")
        r.raise_for_status()

    async def open(self) -> Any:
        return await (await self._get(f"/open/{self.key}/{self.lab}/")).json()

    async def upload(self, path: Path) -> Any:
        filename = str(path).split("/")[-1]
        r = await self._post(f"/upload/{self.key}/{self.lab}/", path.read_text(),
                             headers={"Filename": filename})
        return await r.json()

    async def add_job(self, infiles: list[dict[str, str]], *, image: str = "",
                      jobname: str = "test_job", output_file: str = "result.out",
                      timeout: int = 0, maxsize: int = 0) -> Any:  # noqa: ASYNC109
        request = {"image": image, "files": infiles, "timeout": timeout, "max_kb": maxsize,
                   "output_file": output_file, "jobName": jobname,
                   "accessKeyId": "", "accessKey": ""}
        r = await self._post(f"/addJob/{self.key}/{self.lab}/", json.dumps(request))
        return await r.json()

    async def poll(self, output_file: str = "result.out") -> aiohttp.ClientResponse:
        return await self._get(f"/poll/{self.key}/{self.lab}/{quote(output_file)}/")

    async def info(self) -> Any:
        return await (await self._get(f"/info/{self.key}/")).json()

    async def jobs(self, dead: int = 0) -> Any:
        return await (await self._get(f"/jobs/{self.key}/{dead}/")).json()

    async def pool(self, image: str = "") -> Any:
        return await (await self._get(f"/pool/{self.key}/{image}/")).json()

    async def prealloc(self, image: str = "", num: int = 2) -> Any:
        vm = {"vmms": "localDocker", "cores": 1, "memory": 512}
        r = await self._post(f"/prealloc/{self.key}/{image}/{num}/", json.dumps(vm))
        return await r.json()


def file_to_dict(file: str) -> dict[str, str]:
    """tango-cli's --runJob: how a job folder's files are named in the VM."""
    if "Makefile" in file:
        return {"localFile": file, "destFile": "Makefile"}
    if "handin.tgz" in file:
        return {"localFile": file, "destFile": "handin.tgz"}
    return {"localFile": file, "destFile": file}


async def test_tango_cli_runs_a_job_on_the_local_driver(tmp_path: Path) -> None:
    settings = Settings(default_vmms="local", pool_size=1, driver_options={"local": {
        "state_dir": str(tmp_path / "state"), "uid_base": 64560, "uid_count": 10,
        "owner": "test-tango-cli"}})
    job = tmp_path / "job1"
    job.mkdir()
    (job / "autograde-Makefile").write_text("all:\n\t@sh hello.sh\n")
    (job / "hello.sh").write_text("echo hello from tango-cli\n")
    async with _running(make_config(tmp_path, settings)) as s:
        cli = TangoCli(s, "test", "cli")
        await cli.reachable()
        assert (await cli.open())["statusMsg"] == "Created directory"
        files = sorted(p.name for p in job.iterdir())
        for name in files:
            assert (await cli.upload(job / name))["statusMsg"] == "Uploaded file"
        answer = await cli.add_job([file_to_dict(f) for f in files], image="default",
                                   jobname="test_job-1", output_file="result.out-1")
        assert answer["statusId"] == 0 and answer["statusMsg"] == "Job added", answer
        assert int(answer["jobId"]) == 1
        with anyio.fail_after(60):
            while True:
                r = await cli.poll("result.out-1")
                if r.content_type != "application/json":
                    break
                assert (await r.json())["statusMsg"] == "Output file not found"
                await anyio.sleep(0.05)  # ok-sleep: polling is what tango-cli's user does; bounded
        out = (await r.read()).decode().splitlines()
        assert out[0].endswith("Received job test_job-1:1")
        assert out[1].endswith("Success: Autodriver returned normally")
        assert out[-2:] == ["Autodriver: Job exited with status 0", "hello from tango-cli"]
        # a file uploaded again unchanged
        assert (await cli.upload(job / "hello.sh"))["statusMsg"] == "File exists"
        (dead,) = (await cli.jobs(1))["jobs"]
        assert dead["id"] == 1 and dead["maxOutputFileSize"] == 1000 * 1024  # --maxsize 0
        assert dead["trace"][-1].split("|", 1)[1] == "Success: Autodriver returned normally"
        assert (await cli.jobs(0))["jobs"] == []
        info = await cli.info()
        assert info["statusMsg"] == "Found info successfully"
        assert info["info"]["job_requests"] == 1
        pools = await cli.pool()  # --image "": /pool/<key>//, every pool
        assert pools["statusMsg"] == "Found all pools" and "default" in pools["pools"]
        # --vmms localDocker (always sent) is Tango's name: ignored, as Tango does
        answer = await cli.prealloc("default", 1)
        assert answer == {"statusId": 0, "statusMsg": "VMs preallocated"}, answer
        assert (await cli.pool("default"))["statusMsg"] == "Found pool"
    assert not any((tmp_path / "state" / "test-tango-cli").glob("*/fs"))


class Autolab:
    """Autolab's TangoClient (HTTParty) and the helpers that call it."""

    def __init__(self, s: Srv, key: str, course: str, assessment: str) -> None:
        self.s, self.key = s, key
        self.course, self.assessment = course, assessment
        self.courselab = f"{course}-{assessment}"

    async def _call(self, method: str, path: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None, *, raises: bool = True
                    ) -> aiohttp.ClientResponse:
        hdrs = {"User-Agent": "Ruby", **(headers or {})}
        if body is not None:  # Net::HTTP's default for a POST body
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        r = await self.s.http.request(method, self.s.url + path, data=body, headers=hdrs,
                                      skip_auto_headers=NO_AUTO)
        await r.read()
        # handle_exceptions: a negative statusId raises, and so does HTTP != 200
        if r.content_type == "application/json" and raises:
            answer = await r.json()
            if answer.get("statusId", 0) < 0:
                raise AssertionError(f"TangoException: {answer['statusMsg']}")
        assert r.status == 200
        return r

    async def open(self) -> dict[str, str]:
        r = await self._call("GET", f"/open/{self.key}/{self.courselab}/")
        files: dict[str, str] = (await r.json())["files"]
        return files

    async def upload(self, filename: str, data: bytes) -> None:
        await self._call("POST", f"/upload/{self.key}/{self.courselab}/", data,
                         {"filename": filename})

    async def add_job(self, properties: dict[str, Any]) -> int:
        r = await self._call("POST", f"/addJob/{self.key}/{self.courselab}/",
                             json.dumps(properties).encode())
        return int((await r.json())["jobId"])  # response_json["jobId"].to_i

    async def poll(self, output_file: str) -> aiohttp.ClientResponse:
        # URI.encode leaves @ and + as they are. (handle_exceptions would raise
        # on "Output file not found", statusId -1, Tango's answer too; tango_poll
        # means to poll again until the answer is not JSON.)
        return await self._call("GET", f"/poll/{self.key}/{self.courselab}/"
                                       f"{quote(output_file, safe='@+')}", raises=False)

    async def jobs(self, dead: int = 0) -> list[dict[str, Any]]:
        r = await self._call("GET", f"/jobs/{self.key}/{dead}/")
        jobs: list[dict[str, Any]] = (await r.json())["jobs"]
        return jobs

    async def info(self) -> dict[str, Any]:
        r = await self._call("GET", f"/info/{self.key}/")
        info: dict[str, Any] = (await r.json())["info"]
        return info


def job_state(rjob: dict[str, Any], is_live: bool) -> str:
    """jobs_controller.rb formatRawJob's state."""
    status = rjob["trace"][-1].split("|")[1]
    if is_live:
        return "Waiting" if "Added job" in status else "Running"
    return "Failed" if "Error" in status else "Completed"


@pytest.mark.parametrize("mode", ["polling", "callback"])
async def test_autolab_grades_a_submission(tmp_path: Path, mode: str) -> None:
    settings = Settings(default_vmms="sim", pool_size=1, driver_options={"sim": {
        "images": ["autograding_image"], "latency": {"runJob": 0.05}}})
    # a course and a student whose names contain "Error": a success must
    # still show as Completed on Autolab's jobs page
    email, version = "Error.student+1@example.com", 3
    output_file = f"{email}_{version}_lab1_autograde.txt"
    async with CallbackListener() as cb, _running(make_config(tmp_path, settings)) as s:
        autolab = Autolab(s, "test", "ErrorCodes", "lab1")
        existing = await autolab.open()
        uploads = {f"{email}_{version}_handin.c": b"int main(void) { return 0; }\n",
                   "autograde-Makefile": b"all:\n\t@echo graded\n",
                   "autograde.tar": b"\0" * 1024}
        for name, data in uploads.items():
            if existing.get(name) is None:  # Autolab skips what open listed with its md5
                await autolab.upload(name, data)
        callback_url = "" if mode == "polling" else cb.url(
            "/courses/ErrorCodes/assessments/lab1/autograde_done?dave=ABCDEF&submission_id=7")
        properties = {
            "image": "autograding_image",
            "files": [{"localFile": f"{email}_{version}_handin.c", "destFile": "handin.c"},
                      {"localFile": "autograde-Makefile", "destFile": "Makefile"},
                      {"localFile": "autograde.tar", "destFile": "autograde.tar"}],
            "output_file": output_file,
            "timeout": 180,
            "callback_url": callback_url,
            "jobName": f"ErrorCodes_lab1_{version}_{email}",
            "disable_network": None,  # assessment.disable_network: the column may be null
        }
        job_id = await autolab.add_job(properties)
        assert job_id == 1
        if mode == "polling":
            with anyio.fail_after(30):
                while True:
                    r = await autolab.poll(output_file)
                    if r.content_type != "application/json":
                        break
                    await anyio.sleep(0.05)  # ok-sleep: Autolab polls (every 3 s); bounded
            feedback = await r.read()
        else:
            with anyio.fail_after(30):
                await cb.arrived.wait()
            (got,) = cb.got
            assert got.path_qs.endswith("dave=ABCDEF&submission_id=7")
            feedback = got.body  # params[:file].read
            r = await autolab.poll(output_file)
            assert await r.read() == feedback
        lines = feedback.decode().splitlines()
        assert lines[0].endswith(f"Received job ErrorCodes_lab1_{version}_{email}:1")
        assert re.search(r"Success: Autodriver returned normally$", lines[1])
        # the jobs page
        info = await autolab.info()
        assert isinstance(info["timezone_offset"], int)
        assert await autolab.jobs(0) == []
        (rjob,) = await autolab.jobs(1)
        assert rjob["id"] == job_id and job_state(rjob, is_live=False) == "Completed"
        assert rjob["timeout"] == 180 and isinstance(rjob["vm"]["id"], int)
        assert rjob["vm"]["name"] == "autograding_image"
        assert (rjob["notifyURL"] or "") == callback_url
