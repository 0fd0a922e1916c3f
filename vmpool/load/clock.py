"""A virtual clock for asyncio: an event loop whose time jumps to the next
timer whenever nothing is ready to run.

The loop is asyncio's own selector loop with two changes: ``time()`` is a
counter of the loop's, and its selector, asked to wait ``timeout`` seconds
for I/O, looks at the real file descriptors without waiting and, if none is
ready, moves the counter on by ``timeout`` instead of sleeping. Timers,
``anyio.sleep``, cancel-scope deadlines and everything that reads the loop's
clock (:func:`vmpool.stats.now`) then run in virtual time, at the speed of
the work itself. Nothing else changes: the code under it is the code that
runs in production.

A wait on a thread (``anyio.to_thread``) would let the clock jump while the
thread works; code simulated this way must not use threads (the scheduler's
``output_in_loop`` setting). With no timer at all and nothing ready, the
selector waits for real I/O (a thread's wake-up) as asyncio does.

trio's ``MockClock(autojump_threshold=0)`` does the same for trio; on two
cores this loop runs vmpool's scheduler about twice as fast.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class _JumpingSelector(selectors.BaseSelector):
    """A selector that never sleeps while a timer is due: it jumps the clock."""

    #: real file descriptors are looked at on one call in this many (the
    #: loop calls select() once per turn; the system call would be a good
    #: part of a simulated job's cost, and nothing real is expected)
    POLL_EVERY = 32

    def __init__(self, loop: VirtualClockLoop, inner: selectors.BaseSelector) -> None:
        self._loop = loop
        self._inner = inner
        self._turns = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # nothing scheduled: only real I/O (a thread) can wake the loop
            return self._inner.select(None)
        self._turns += 1
        if self._turns % self.POLL_EVERY == 0:
            ready = self._inner.select(0)
            if ready:
                return ready
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop on a virtual clock (see the module doc)."""

    def __init__(self, start: float = 0.0) -> None:
        self._virtual = start
        super().__init__(_JumpingSelector(self, selectors.DefaultSelector()))
        # asyncio runs timers due within this of now: none early
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual

    def advance(self, seconds: float) -> None:
        """Move the clock on (the selector does, when nothing is ready)."""
        if seconds > 0:
            self._virtual += seconds


def run_virtual(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``anyio.run(fn)`` on asyncio with a virtual clock."""
    return anyio.run(fn, backend="asyncio", backend_options={"loop_factory": VirtualClockLoop})
