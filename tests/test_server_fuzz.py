"""Fuzzing the HTTP API with hypothesis.

The server runs in-process (``serve()`` on the sim driver, in a thread with
its own event loop); requests are written by hand on a raw socket, so that
any method, request target and header value reaches aiohttp as generated:
paths built from the route templates with odd segments (``..``,
``%2e%2e``, encoded slashes and NULs, very long, unicode), odd ``Filename``
headers, random bodies and addJob objects with wrong types; names with
control characters (a newline in ``output_file`` once ended the server when
its callback was sent); callbacks to a listener on 127.0.0.1 that answers.

For every request:

- never a 5xx;
- a 200 answer is Tango's: JSON ``{"statusId": 0 | -1, "statusMsg": str}``,
  except ``GET /`` (the greeting), a finished poll (octet-stream) and
  ``/metrics`` (text);
- no answer says ``Internal error`` (the catch-all for a bug of ours);
- a request to a route's own method with well-formed segments is never a
  404/405: only unknown paths and methods get the router's answer;
- nothing in vmpool logs an error;
- the server still answers ``GET /`` (after every example: a job's
  background work, such as its callback, must not end it).

Afterwards every file it wrote is in a
courselab folder of a configured key (no path escaped), and it shuts down
cleanly.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vmpool import Settings
from vmpool.server import HELLO, serve
from vmpool.server.config import ServerConfig

from .jobs import CallbackReceiver

KEY = "fuzzkey"
LAB = "lab"
IMAGES = ["img.img", "other.img"]

# (methods, path template): the server's routes, each also with a trailing slash
ROUTES: list[tuple[tuple[str, ...], list[str]]] = [
    (("GET",), []),
    (("GET",), ["open", "{key}", "{courselab}"]),
    (("POST",), ["upload", "{key}", "{courselab}"]),
    (("POST",), ["addJob", "{key}", "{courselab}"]),
    (("GET",), ["poll", "{key}", "{courselab}", "{outputFile}"]),
    (("GET",), ["getPartialOutput", "{key}", "{jobId}"]),
    (("GET",), ["info", "{key}"]),
    (("GET",), ["jobs", "{key}", "{deadJobs}"]),
    (("GET",), ["pool", "{key}"]),
    (("GET",), ["pool", "{key}", "{image}"]),
    (("GET", "POST"), ["prealloc", "{key}", "{image}", "{num}"]),
    (("GET",), ["metrics"]),
]
# the routes that take a body or a file name, more often
WEIGHTED_ROUTES = ROUTES + [r for r in ROUTES for _ in range(3) if r[1][:1] == ["addJob"]] + [
    r for r in ROUTES if r[1][:1] in (["upload"], ["poll"], ["prealloc"])]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
MAX_UPLOAD = 64 * 1024
BIG = MAX_UPLOAD + 1
EXAMPLES = int(os.environ.get("VMPOOL_FUZZ_EXAMPLES", "1000"))
PLAIN = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------
# The server, in a thread with its own event loop


class ServerThread:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port = 0
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmpool-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the server did not start within 30 s")
        if self.error is not None:
            raise RuntimeError("the server failed to start") from self.error

    def _run(self) -> None:
        async def main() -> None:
            self._stop = anyio.Event()
            self._token = anyio.lowlevel.current_token()

            def ready(port: int) -> None:
                self.port = port
                self._ready.set()

            await serve(self.config, ready=ready, stop=self._stop)

        try:
            anyio.run(main)
        except BaseException as e:
            self.error = e
            self._ready.set()

    def close(self, limit: float = 30) -> None:
        anyio.from_thread.run_sync(self._stop.set, token=self._token)
        self._thread.join(limit)
        assert not self._thread.is_alive(), f"the server did not stop within {limit} s"
        if self.error is not None:
            raise AssertionError("the server ended with an error") from self.error


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


SINK = CallbackReceiver()  # takes every callback, answers 200


def send(port: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
         body: bytes) -> Answer:
    """One request, written as given (no client-side validation or quoting)."""
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1",
            b"Connection: close"]
    head += [k + b": " + v for k, v in headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        resp.close()
    return Answer(resp.status, ctype.split(";")[0].strip(), data)


class ErrorLog(logging.Handler):
    """Errors logged by vmpool (a bug caught and logged is still a bug), and
    the scheduler's warnings (a try that failed: the sim driver never fails)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.name == "vmpool.scheduler":
            exc = record.exc_info[1] if record.exc_info else None
            text = f"{record.name}: {record.getMessage()[:300]} {exc!r:.300}"
            self.records.append((record.name, record.levelno, text))

    def request_errors(self, since: int) -> list[str]:
        """What the route handlers logged (before answering) since ``since``."""
        return [t for name, level, t in self.records[since:]
                if name == "vmpool.server" and level >= logging.ERROR]

    def all(self) -> list[str]:
        return [t for _, _, t in self.records]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        keys=[KEY],
        courselabs=str(root / "labs"),
        database=str(root / "db" / "jobs.sqlite"),
        max_upload_bytes=MAX_UPLOAD,
        callback_tries=1,
        callback_timeout=2,
        settings=Settings(
            default_vmms="sim",
            pool_size=1,
            runjob_timeout=5,
            backoff_initial=0.01,
            backoff_max=0.1,
            driver_options={"sim": {"images": IMAGES, "latency": {"runJob": 0.001}}},
        ),
    )
    srv = ServerThread(config)
    yield srv, root
    # (closed by the test, which checks it; this only makes sure)
    if srv._thread.is_alive():
        anyio.from_thread.run_sync(srv._stop.set, token=srv._token)
        srv._thread.join(30)


# --------------------------------------------------------------------------
# Strategies

# segments that are well formed: a route with only these must be found
plain = st.from_regex(PLAIN, fullmatch=True).filter(lambda s: len(s) <= 24)

odd = st.one_of(
    st.sampled_from([
        ".", "..", "...", "%2e", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "..%2f..%2fetc",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%5c..", "%00", "a%00b", "%2F", "a%2Fb", "%2f",
        "%", "%zz", "%ff", "%C0%AE%C0%AE", "~", "%20", "a%20b", "\\", "..\\..", "%5C",
        "%0a", "%0d%0a", "%09", "-1", "0", "1", "007", "1_0", "+1", "%D9%A3",
        "1e3", "0x10", "99999999999999999999999", "NaN",
        KEY, LAB, "Makefile", "out.txt", *IMAGES,
    ]),
    st.sampled_from([100, 250, 256, 1000, 5000, 9000]).map(lambda n: "a" * n),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
    .map(lambda s: quote(s, safe="")),
    plain,
)
# raw bytes in the request target that HTTP does not allow (the parser's 400)
raw_odd = st.sampled_from(["é", "\x00", " ", "\x7f", "\u2028", "a b"])

GOOD = {
    "{key}": st.just(KEY),
    "{courselab}": st.sampled_from([LAB, "other"]),
    "{outputFile}": st.sampled_from(["out.txt", "nope.txt", "job.out"]),
    "{jobId}": st.integers(0, 5).map(str),
    "{deadJobs}": st.sampled_from(["0", "1"]),
    "{image}": st.sampled_from([*IMAGES, "nope.img"]),
    "{num}": st.one_of(st.integers(0, 3), st.integers(-3, 10**30)).map(str),
}


@st.composite
def segments(draw: st.DrawFn, template: list[str]) -> tuple[list[str], bool]:
    """A path's segments from ``template``, and whether all are well formed."""
    out: list[str] = []
    well_formed = True
    # half the time every segment is right, so that the body is what is tested
    all_good = draw(st.booleans())
    for part in template:
        if not part.startswith("{"):
            choice = "keep" if all_good else draw(st.sampled_from(["keep"] * 8 + ["case", "odd"]))
            if choice == "keep":
                out.append(part)
                continue
            seg = part.upper() if choice == "case" else draw(odd)
        else:
            choice = "good" if all_good else draw(
                st.sampled_from(["good"] * 4 + ["plain", "odd", "odd", "raw"]))
            if choice == "good":
                seg = draw(GOOD[part])
            elif choice == "plain":
                seg = draw(plain)
            elif choice == "raw":
                seg = draw(raw_odd)
            else:
                seg = draw(odd)
        if not PLAIN.fullmatch(seg) or (not part.startswith("{") and seg != part):
            well_formed = False
        out.append(seg)
    return out, well_formed


json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_any = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=10,
)
file_name_value = st.one_of(
    st.sampled_from(["Makefile", "out.txt", "", ".", "..", "../x", "a/b", "..hidden",
                     ".hidden", "a" * 300, "\x00", "a\x00b", "\ud800", "é", "Makefile/",
                     "a\nb", "a\r\nFilename: x", "a\tb", "a\x7fb", "\x1b[2J", "\udc80"]),
    st.text(max_size=20),
    json_any,
)
good_job: dict[str, st.SearchStrategy[Any]] = {
    "image": st.sampled_from([*IMAGES, "nope.img", ""]),
    "jobName": st.one_of(plain, st.text(max_size=30)),
    "output_file": st.one_of(st.sampled_from(["job.out", "out.txt"]), file_name_value),
    "files": st.one_of(
        st.just([{"localFile": "Makefile", "destFile": "Makefile"}]),
        st.lists(st.fixed_dictionaries({"localFile": file_name_value,
                                        "destFile": file_name_value}), max_size=3),
        json_any,
    ),
    "timeout": st.one_of(st.sampled_from([0, 1, 5, 2.5, -1, None, "5", float("nan"),
                                          float("inf"), float("-inf"), 10**400, 1e-300]),
                         json_scalar),
    "max_kb": json_scalar,
    "callback_url": st.one_of(st.sampled_from([SINK.url, SINK.url, "http://127.0.0.1:1/cb",
                                               "ftp://x", "", "http://127.0.0.1:99999/cb",
                                               "http://[::1/cb"]),
                              json_scalar),
    "notifyURL": json_scalar,
    "disable_network": json_scalar,
    "cores": json_scalar,
    "memory": json_scalar,
    "vmms": st.sampled_from(["sim", "nope", "", 3, None]),
    "accessKeyId": json_scalar,
    "accessKey": json_scalar,
}


FREQUENT = ["timeout", "output_file", "files", "max_kb", "jobName", "image"]


@st.composite
def add_job_body(draw: st.DrawFn) -> bytes:
    # a few fields changed (more often the ones whose values reach the disk or a clock)
    keys = draw(st.lists(st.sampled_from(sorted(good_job) + 2 * FREQUENT), unique=True,
                         max_size=3))
    base = {"image": "img.img", "jobName": "fuzz", "output_file": "job.out",
            "files": [{"localFile": "Makefile", "destFile": "Makefile"}], "timeout": 5}
    job: Any = dict(base)
    for k in keys:
        if draw(st.integers(0, 3)) == 0:
            job.pop(k, None)  # missing
        else:
            job[k] = draw(good_job[k])
    if draw(st.integers(0, 9)) == 0:
        job = draw(json_any)  # not an object at all, or an unrelated one
    return json.dumps(job).encode()


prealloc_body = st.fixed_dictionaries(
    {}, optional={"cores": json_scalar, "memory": json_scalar,
                  "vmms": st.sampled_from(["sim", "nope", 1])},
).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(
    st.just(b""),
    st.just(b"[" + b" " * BIG + b"]"),  # over the server's upload limit
    st.binary(max_size=512),
    add_job_body(),
    json_any.map(lambda v: json.dumps(v).encode()),
    prealloc_body,
)

header_values = st.one_of(
    st.sampled_from([b"", b".", b"..", b"../x", b"../../etc/passwd", b"a/b", b"a\\b",
                     b".hidden", b"x" * 300, b"x" * 5000, b"\xff\xfe", "\u00e9".encode(),
                     b" ", b"\t", b"Makefile", b"out.txt", b"a\x00b", b"%2e%2e", b"a\rb",
                     b"a\tb", b"a\x7fb", b"\x1b[2J"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
    .map(str.encode),
)


def job_json(**over: Any) -> bytes:
    job = {"image": IMAGES[0], "jobName": "fuzz", "output_file": "job.out",
           "files": [{"localFile": "Makefile", "destFile": "Makefile"}], "timeout": 5, **over}
    return json.dumps(job).encode()


def add_job_req(body: bytes) -> Req:
    return Req("POST", f"/addJob/{KEY}/{LAB}/".encode(), [], body, True, ROUTES[3][1])


@dataclass
class Req:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: route, method and segments all well formed: must be found
    must_match: bool
    route: list[str] | None

    @property
    def http_ok(self) -> bool:
        """Whether HTTP allows this request line and these headers."""
        return (
            all(0x21 <= c <= 0x7E for c in self.target) and len(self.target) < 8000
            and all(c == 0x09 or 0x20 <= c <= 0x7E or c >= 0x80
                    for _, v in self.headers for c in v)
            and all(len(v) < 8000 for _, v in self.headers)
        )


@st.composite
def requests(draw: st.DrawFn) -> Req:
    if draw(st.integers(0, 9)) == 0:
        parts = draw(st.lists(st.one_of(odd, raw_odd), max_size=6))
        path, route, must = "/" + "/".join(parts), None, False
        methods: tuple[str, ...] = ("GET",)
    else:
        methods, template = draw(st.sampled_from(WEIGHTED_ROUTES))
        parts, well_formed = draw(segments(template))
        slash = bool(template) and draw(st.booleans())
        path = "/" + "/".join(parts) + ("/" if slash else "")
        route = template
        must = well_formed
    if draw(st.integers(0, 7)) == 0:
        method = draw(st.sampled_from(METHODS))
    else:
        method = draw(st.sampled_from(methods))
    must = must and route is not None and method in methods
    if draw(st.integers(0, 19)) == 0:
        path += "?" + draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                   max_size=10)).replace("#", "")
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.booleans()):
        headers.append((b"Filename", draw(header_values)))
    if draw(st.integers(0, 3)) == 0:
        headers.append((b"Content-Type", draw(st.sampled_from(
            [b"application/json", b"text/plain", b"multipart/form-data; boundary=x",
             b"application/x-www-form-urlencoded", b"\xff"]))))
    if route and route[0] == "addJob" and draw(st.integers(0, 9)) < 7:
        body = draw(add_job_body())
    elif route and route[0] == "prealloc" and draw(st.booleans()):
        body = draw(prealloc_body)
    else:
        body = draw(bodies) if method not in ("GET", "HEAD") or draw(st.booleans()) else b""
    return Req(method, path.encode("utf-8", "surrogatepass"), headers, body, must, route)


# --------------------------------------------------------------------------
# The test


def check(req: Req, a: Answer) -> None:
    where = f"{req.method} {req.target[:200]!r} -> {a.status} {a.content_type} {a.body[:300]!r}"
    assert a.status < 500, where
    if req.must_match and req.http_ok:
        assert a.status == 200, where
    if a.status in (404, 405):
        return  # the router's answer: an unknown path or method
    if a.status != 200:
        # the HTTP parser's answer to a malformed request, and only to one
        assert a.status in (400, 413, 414, 431) and not req.http_ok, where
        return
    if req.method == "HEAD":
        return
    route = req.route
    if route is None and (a.body == HELLO.encode()
                          or a.content_type in ("application/octet-stream", "text/plain")):
        return  # a random path the parser took for a route (it tolerates some oddities)
    if route == []:
        assert a.body == HELLO.encode(), where
    elif route == ["metrics"]:
        assert a.content_type == "text/plain", where
    elif route and route[0] == "poll" and a.content_type == "application/octet-stream":
        pass  # a finished job's output
    else:
        assert a.content_type == "application/json", where
        answer = json.loads(a.body)
        assert isinstance(answer, dict), where
        assert answer.get("statusId") in (0, -1), where
        assert isinstance(answer.get("statusMsg"), str), where
        assert not answer["statusMsg"].startswith("Internal error"), where


def test_fuzz_the_http_api(server: tuple[ServerThread, Path]) -> None:
    srv, root = server
    errors = ErrorLog()
    vmpool_log = logging.getLogger("vmpool")
    vmpool_log.addHandler(errors)
    # aiohttp logs every request its parser refuses, with a traceback
    parser_log = logging.getLogger("aiohttp.server")
    parser_level = parser_log.level
    parser_log.setLevel(logging.CRITICAL)
    try:
        # a courselab with a Makefile, so that some jobs are valid and run
        assert json.loads(send(srv.port, "GET", f"/open/{KEY}/{LAB}/".encode(), [], b"").body)[
            "statusId"] == 0
        up = send(srv.port, "POST", f"/upload/{KEY}/{LAB}/".encode(),
                  [(b"Filename", b"Makefile")], b"all:\n\techo fuzz\n")
        assert json.loads(up.body)["statusMsg"] == "Uploaded file"
        seen: dict[int, int] = {}
        messages: dict[str, int] = {}

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(req=requests())
        # bugs this fuzzing found, always tried first
        @example(req=add_job_req(b"null"))
        @example(req=add_job_req(job_json(timeout=float("nan"))))
        @example(req=add_job_req(job_json(timeout=float("inf"))))
        @example(req=add_job_req(job_json(timeout=10**400)))
        @example(req=add_job_req(job_json(output_file="\ud800")))
        @example(req=add_job_req(job_json(output_file="x" * 256)))
        @example(req=add_job_req(job_json(output_file="a\nb", callback_url=SINK.url)))
        @example(req=add_job_req(job_json(output_file="cb.out", callback_url=SINK.url)))
        @example(req=Req("POST", f"/upload/{KEY}/{LAB}/".encode(), [(b"Filename", b"a\tb")],
                         b"x", True, ROUTES[2][1]))
        @example(req=Req("GET", f"/open/{KEY}/{'a' * 256}/".encode(), [], b"", True,
                         ROUTES[1][1]))
        @example(req=Req("POST", f"/upload/{KEY}/{LAB}/".encode(), [(b"Filename", b"x" * 256)],
                         b"x", True, ROUTES[2][1]))
        @example(req=Req("GET", f"/prealloc/{KEY}/{IMAGES[0]}/{10**30}/".encode(), [], b"",
                         True, ROUTES[10][1]))
        def fuzz(req: Req) -> None:
            since = len(errors.records)
            a = send(srv.port, req.method, req.target, req.headers, req.body)
            seen[a.status] = seen.get(a.status, 0) + 1
            if a.content_type == "application/json":
                with contextlib.suppress(ValueError, AttributeError):
                    msg = str(json.loads(a.body).get("statusMsg", "")).split(":")[0]
                    messages[msg] = messages.get(msg, 0) + 1
            check(req, a)
            assert errors.request_errors(since) == []
            alive = send(srv.port, "GET", b"/", [], b"")
            assert (alive.status, alive.body) == (200, HELLO.encode()), "the server is down"

        fuzz()
        print(f"\nstatuses: {dict(sorted(seen.items()))}\nanswers: {messages}")
        # the strategies reach past the router and the key check
        assert messages.get("Job added", 0) > 0 and messages.get("Invalid job", 0) > 0

        # still serving
        hello = send(srv.port, "GET", b"/", [], b"")
        assert (hello.status, hello.body) == (200, HELLO.encode())
        # nothing written outside a courselab folder of the configured key
        labs = root / "labs"
        for dirpath, dirs, files in os.walk(root):
            d = Path(dirpath)
            if d == root:
                assert sorted(dirs) == ["db", "labs"] and files == []
            elif d == root / "db":
                assert all(f.startswith("jobs.sqlite") for f in files) and dirs == []
            elif d == labs:
                assert files == [] and all(x.startswith(f"{KEY}-") for x in dirs), dirs
            elif d.parent == labs:
                assert dirs == ["output"], (d, dirs)
            else:
                assert d.parent.parent == labs and d.name == "output" and dirs == [], d
        srv.close()
        assert SINK.got  # callbacks were delivered, not only tried
    finally:
        vmpool_log.removeHandler(errors)
        parser_log.setLevel(parser_level)
    # jobs end after their answer: what went wrong in one is seen here
    assert errors.all() == []
