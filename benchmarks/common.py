"""What the benchmark scripts share."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio


def run_and_report(
    main_async: Callable[[argparse.Namespace], Awaitable[Any]], args: argparse.Namespace
) -> None:
    """Run a benchmark; with ``--json FILE`` also write its results there."""
    result = anyio.run(main_async, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)
