"""One thread that runs blocking calls in order, off the event loop.

For work that must never run on the event loop but is too frequent for a
thread hand-off per call (the output file of every job, every store call
of the server): calls made while the thread is busy queue up and run back
to back, and each is answered on the event loop without the thread waiting
for the loop. Under asyncio the answer comes through
``loop.call_soon_threadsafe``; under another anyio backend the call falls
back to :func:`anyio.to_thread.run_sync`.

The caller waits for its call to finish even if it is cancelled meanwhile
(as ``anyio.to_thread.run_sync`` does): a write or a commit cut off half-way
is never left behind a caller that moved on.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")


class SerialThread:
    """Runs ``fn(*args)`` calls in one thread, in the order they were made."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def call(self, fn: Callable[..., T], *args: Any, shielded: bool = False) -> T:
        """``fn(*args)`` in the thread; its result or its exception.

        ``shielded=True``: the caller already runs in a shielded cancel scope
        (no second one is made for the wait, on a path where each costs).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: anyio's own worker threads
            return await anyio.to_thread.run_sync(fn, *args)
        self._start()
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, fut, fn, args))
        if shielded:
            return await fut
        with anyio.CancelScope(shield=True):
            result = await fut
        return result

    def close(self) -> None:
        """Stop once what is queued has run (does not wait for it)."""
        with self._lock:
            if self._thread is not None:
                self._calls.put(None)
                self._thread = None

    def join(self, timeout: float = 30.0) -> None:
        """Stop once what is queued has run, and wait for that."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._calls.put(None)
            thread.join(timeout)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self.name,
                                                     daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        # Answers are posted to the loop in batches: one wake-up of the loop
        # for calls that ran back to back, not one each (a burst of finishing
        # jobs); a batch is posted as soon as nothing more is queued.
        done: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any,
                         BaseException | None]] = []
        while True:
            if done and self._calls.empty():
                self._post(done)
                done = []
            item = self._calls.get()
            if item is None:
                self._post(done)
                return
            loop, fut, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the caller, never lost here
                result, error = None, e
            done.append((loop, fut, result, error))
            if len(done) >= 64:
                self._post(done)
                done = []

    @staticmethod
    def _post(done: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any,
                               BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for loop, fut, result, error in done:
            by_loop.setdefault(loop, []).append((fut, result, error))
        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_settle_all, answers)


def _settle_all(answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, error in answers:
        _settle(fut, result, error)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
