"""Fair share between courselabs, in the simulator: course A submits 2,000
jobs at once, course B one job a minute; 40 VMs, jobs of 20-90 s. One FIFO
line (Tango's way) against vmpool's fair line, on the same trace.

    python benchmarks/bench_fair.py [--json FILE] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vmpool.load.report import plot_fair
from vmpool.load.simulate import Candidate, Latencies, simulate
from vmpool.load.workload import Arrival, LogNormal, burst, merge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--plot", help="write the plot (PNG) here")
    args = ap.parse_args()
    durations = LogNormal.from_range(20, 90)
    a = burst(2000, courselab="A", durations=durations, seed=1)
    b = [Arrival(at=60.0 * i + 7, image="grader", courselab="B", duration=45.0)
         for i in range(60)]
    arrivals = merge(a, b)
    lat = Latencies(initializeVM=20, waitVM=5, copyIn=0.05, copyOut=0.05, destroyVM=2)
    out = {}
    runs = {}
    for name, fair in (("fifo", False), ("fair", True)):
        r = simulate(arrivals, Candidate(40, 40, reuse=True, fair=fair), lat)
        runs[name] = r
        out[name] = {
            "A_p95_wait_s": round(r.wait(95, "A"), 1), "B_p95_wait_s": round(r.wait(95, "B"), 1),
            "B_max_wait_s": round(max(r.waits_by_courselab["B"]), 1),
            "A_last_end_s": round(r.last_end_by_courselab["A"], 1),
            "makespan_s": round(r.makespan, 1), "wall_s": round(r.wall_seconds, 2)}
        print(f"{name:>4}: B p95 wait {out[name]['B_p95_wait_s']:7.1f} s (max "
              f"{out[name]['B_max_wait_s']:.1f}), A p95 {out[name]['A_p95_wait_s']:7.1f} s, "
              f"A done at {out[name]['A_last_end_s']:.0f} s, all done at "
              f"{out[name]['makespan_s']:.0f} s")
    if args.plot:
        plot_fair(runs["fair"], runs["fifo"], arrivals, args.plot, ["A", "B"])
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
