"""The conformance suite catches a broken driver by the rule's name: each
mutant of the sim driver (tests/sim_mutants.py) breaks one rule, and the
suite run on it fails the test named for that rule."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .sim_mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[1]


def _failed_tests(mutant: str | None, rule: str | None = None) -> set[str]:
    """The rules the suite fails on ``mutant`` (only ``rule``, if given)."""
    env = {**os.environ, "VMPOOL_SIM_MUTANT": mutant or ""}
    target = "tests/test_contract_sim.py" + (f"::{rule}" if rule else "")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
         "--timeout", "120", target],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    failed = set(re.findall(r"^FAILED tests/test_contract_sim\.py::(\w+)", run.stdout, re.M))
    if run.returncode not in (0, 1) or (run.returncode == 1 and not failed):
        pytest.fail(f"the suite did not run on mutant {mutant}:\n{run.stdout[-3000:]}"
                    f"\n{run.stderr[-2000:]}")
    return failed


def test_every_mutant_fails_the_rule_it_breaks() -> None:
    assert _failed_tests(None) == set(), "the sim itself must pass the suite"
    missed = {}
    report = []
    # side by side: most of each run is pytest starting, or a mutant's job
    # running on past its cancel
    with ThreadPoolExecutor(4) as runs:
        results = dict(zip(MUTANTS, runs.map(lambda m: _failed_tests(m, MUTANTS[m][1]),
                                              MUTANTS), strict=True))
    for name, (_, rule) in MUTANTS.items():
        failed = results[name]
        report.append(f"{name}: {', '.join(sorted(failed)) or 'nothing failed'}")
        if rule not in failed:
            missed[name] = (rule, sorted(failed))
    print("\n".join(report))
    assert not missed, f"rules that did not catch their mutant: {missed}"
