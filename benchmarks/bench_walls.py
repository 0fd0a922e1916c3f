"""What the sandbox walls cost: the warm trivial job's latency before and
after them, in the same run, and what each wall costs on its own.

"Before" is a checkout (git worktree) of an earlier revision, by default
the last one without the walls of issue 8; "after" is this tree. Each
variant runs in its own process (``warm_latency.py``), and the variants
take turns, round after round, so that the machine's drift is spread over
all of them. A wall's own cost is "after" against "after" with that wall
switched off (a driver option).

    python benchmarks/bench_walls.py [--rounds 5] [--jobs 20] [--drivers local,docker]
                                     [--before REV] [--json FILE]

Run as root; the Docker rows need DOCKER_HOST (scripts/docker-up.sh) and
the image vmpool/grader (scripts/build-image.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import latency_row

ROOT = Path(__file__).resolve().parents[1]
#: the last revision before the walls of issue 8
BEFORE = "5fea712"

# (name, tree, driver, options, network on)
Variant = tuple[str, str, str, dict[str, Any], bool]


def variants(drivers: list[str]) -> list[Variant]:
    v: list[Variant] = []
    if "local" in drivers:
        v += [
            ("local before", "before", "local", {}, False),
            ("local after", "after", "local", {}, False),
            ("local after, no seccomp filter", "after", "local", {"seccomp": False}, False),
            ("local after, no quota tmpfs", "after", "local", {"disk_quota": 0}, False),
            ("local before, network on (host's)", "before", "local", {}, True),
            ("local after, network on (pasta)", "after", "local", {}, True),
        ]
    if "docker" in drivers:
        v += [
            ("docker before", "before", "docker", {}, False),
            ("docker after", "after", "docker", {}, False),
            ("docker after, no seccomp filter", "after", "docker", {"seccomp": False}, False),
        ]
    return v


def run(tree: Path, driver: str, jobs: int, options: dict[str, Any], network: bool) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).with_name("warm_latency.py")), driver, str(jobs),
           json.dumps(options), *(["network"] if network else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"{driver} in {tree} failed:\n{done.stderr[-3000:]}")
    return [float(x) for x in json.loads(done.stdout.strip().splitlines()[-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=20, help="jobs per variant per round")
    ap.add_argument("--drivers", default="local,docker")
    ap.add_argument("--before", default=BEFORE, help="the revision to compare with")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    chosen = variants(args.drivers.split(","))
    with tempfile.TemporaryDirectory(prefix="vmpool-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.before], check=True, capture_output=True)
        try:
            trees = {"before": before, "after": ROOT}
            lat: dict[str, list[float]] = {name: [] for name, *_ in chosen}
            for r in range(args.rounds):
                for name, tree, driver, options, network in chosen:
                    lat[name] += run(trees[tree], driver, args.jobs, options, network)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], check=False, capture_output=True)
    rows = [latency_row(name, lat[name]) for name, *_ in chosen]
    p50 = {r["mode"]: float(r["p50_ms"]) for r in rows}
    print(f"\n{'variant':<38} {'p50 ms':>8} {'p99 ms':>8} {'jobs':>5}")
    for r in rows:
        print(f"{r['mode']:<38} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['jobs']:>5}")
    summary: dict[str, float] = {}
    for drv in ("local", "docker"):
        if f"{drv} after" not in p50:
            continue
        after = p50[f"{drv} after"]
        summary[f"{drv} after/before"] = round(after / p50[f"{drv} before"], 3)
        for name in p50:
            if name.startswith(f"{drv} after, no "):
                summary[f"{drv}: {name.split(', no ')[1]} costs (ms)"] = round(after - p50[name], 1)
    if "local after, network on (pasta)" in p50:
        summary["local network on: after/before"] = round(
            p50["local after, network on (pasta)"] / p50["local before, network on (host's)"], 3)
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2)
                                   + "\n")


if __name__ == "__main__":
    main()
