"""One measurement for bench_walls.py: the warm trivial job's latency on one
driver, run with whatever vmpool is first on ``sys.path`` (bench_walls.py
runs this file in a checkout of an earlier revision too, so it uses only
what every revision has: Manager, make_job, the drivers' constructors).

    python warm_latency.py DRIVER JOBS OPTIONS_JSON [NETWORK_ON]

Prints one JSON line: the latencies in seconds.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from vmpool import Manager, Outcome, Settings, make_job

IMAGES = {"local": "default", "docker": "vmpool/grader:latest"}


async def measure(driver: str, jobs: int, options: dict[str, Any], network: bool) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="vmpool-walls-") as tmp:
        work = Path(tmp)
        (work / "Makefile").write_text("all:\n\t@echo hello\n")
        if driver == "local":
            from vmpool_drivers.local import LocalVMMS

            drv: Any = LocalVMMS(owner=f"walls-{time.time_ns()}",
                                 state_dir=str(work / "state"), **options)
        else:
            from vmpool_drivers.docker import DockerVMMS

            drv = DockerVMMS(owner=f"walls-{time.time_ns()}", **options)
        image = IMAGES[driver]
        lat = []
        async with Manager(Settings(default_vmms=driver, pool_size=2),
                           drivers={driver: drv}) as mgr:
            pool = await mgr.ensure_pool(image)
            for i in range(jobs + 2):  # the first two warm caches up: not counted
                await pool.wait_until(lambda s: s.free == 2 and s.destroying == 0)
                t0 = time.perf_counter()
                h = await mgr.submit(make_job(image, [(str(work / "Makefile"), "Makefile")],
                                              str(work / f"out-{i}"), name="bench",
                                              disable_network=not network))
                r = await h.wait()
                if i >= 2:
                    lat.append(time.perf_counter() - t0)
                assert r.outcome is Outcome.SUCCESS, Path(r.output_file).read_text()
        return lat


def main() -> None:
    driver, jobs, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    network = sys.argv[4:] == ["network"]
    print(json.dumps(anyio.run(measure, driver, jobs, options, network)))


if __name__ == "__main__":
    main()
