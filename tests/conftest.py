"""Shared fixtures: a job folder, a job factory, fast settings."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmpool import Settings, TangoJob, make_job

from .ec2_world import EC2World, MotoServer
from .sshd import SSHD, SSHHosts, share_docker_socket

CTIME = r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}"


def autograder_re(msg: str) -> str:
    """A regex for one ``Autograder [<ctime>]: <msg>`` line (msg taken literally)."""
    return rf"Autograder \[{CTIME}\]: {re.escape(msg)}"


@pytest.fixture
def jobdir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    (d / "Makefile").write_text("all:\n\techo hello\n")
    (tmp_path / "out").mkdir()
    return d


JobFactory = Callable[..., TangoJob]


@pytest.fixture
def new_job(jobdir: Path) -> JobFactory:
    counter = iter(range(1, 10**9))

    def factory(image: str = "img.img", name: str | None = None, **kw: object) -> TangoJob:
        n = next(counter)
        out = jobdir.parent / "out" / f"{name or 'job'}-{n}.out"
        return make_job(
            image,
            [(str(jobdir / "Makefile"), "Makefile")],
            str(out),
            name=name or f"job{n}",
            **kw,  # type: ignore[arg-type]
        )

    return factory


@pytest.fixture
def fast() -> Settings:
    """Short deadlines so that timeouts are seen in well under a second."""
    return Settings(
        waitvm_timeout=0.5,
        runjob_timeout=2.0,
        runjob_grace=0.3,
        initializevm_timeout=1.0,
        copyin_timeout=0.5,
        copyout_timeout=0.5,
        destroy_timeout=0.5,
        backoff_initial=0.01,
        backoff_max=0.05,
        pool_size=2,
        default_vmms="sim",
    )


ROOT = Path(__file__).resolve().parents[1]
GRADER_IMAGE = "vmpool/grader:latest"


@pytest.fixture(scope="session")
def docker_host() -> str:
    """A reachable Docker engine with vmpool's grading image.

    Starts dockerd on a private socket (scripts/docker-up.sh) when none
    answers, and builds the image (scripts/build-image.sh) when missing. If
    that fails the test fails, loudly: in CI a missing engine is an error,
    never a skip.
    """
    import os
    import subprocess

    up = subprocess.run(
        ["bash", str(ROOT / "scripts" / "docker-up.sh")],
        capture_output=True, text=True, timeout=600,
    )
    if up.returncode != 0:
        pytest.fail(f"no Docker engine and dockerd could not be started:\n{up.stderr}")
    host = up.stdout.strip().splitlines()[-1]
    os.environ["DOCKER_HOST"] = host
    build = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-image.sh"), GRADER_IMAGE],
        capture_output=True, text=True, timeout=1800,
    )
    if build.returncode != 0:
        pytest.fail(f"building {GRADER_IMAGE} failed:\n{build.stderr}")
    return host


@pytest.fixture(scope="session")
def ssh_hosts(docker_host: str) -> Iterator[SSHHosts]:
    """Three real sshd "hosts" on 127.0.0.1 in front of the one Docker engine
    (tests/sshd.py). If sshd cannot start the test fails, loudly."""
    if not Path(SSHD).exists():
        pytest.fail(f"{SSHD} missing: apt-get install openssh-server (.ci/run does)")
    # not below pytest's tmp directory (owner-only): sshd reads the
    # authorized keys as the login user
    root = Path(tempfile.mkdtemp(prefix="vmpool-sshd-"))
    hosts = SSHHosts(root, 3, share_docker_socket(docker_host))
    try:
        hosts.start()
    except Exception as e:
        hosts.stop()
        pytest.fail(f"sshd did not start: {e}")
    yield hosts
    if os.environ.get("VMPOOL_SSHD_LOG"):
        for h in hosts.hosts:
            print(f"--- sshd {h.name}", *h.log, sep="\n")
    hosts.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto in server mode on 127.0.0.1: the EC2 endpoint of the EC2
    driver's tests (reset after each test by ``ec2_world``)."""
    try:
        server = MotoServer()
    except Exception as e:
        pytest.fail(f"moto's server did not start: {e}")
    yield server
    server.stop()


@pytest.fixture
def ec2_world(moto_server: MotoServer, docker_host: str) -> Iterator[EC2World]:
    """Each moto instance a machine of its own on 127.0.0.1 (a container of
    the grading image running a real sshd, tests/ec2_world.py)."""
    root = Path(tempfile.mkdtemp(prefix="vmpool-ec2-world-"))
    world = EC2World.create(moto_server, docker_host, root)
    try:
        yield world
    finally:
        world.close()
        moto_server.reset()
        shutil.rmtree(root, ignore_errors=True)
    assert world.containers(all=True) == []  # close() left no machine
