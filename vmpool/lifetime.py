"""The lifetime of an object that runs background tasks (a pool, a manager).

``async with obj:`` is its whole life, built on one :class:`AsyncExitStack`:

1. a task group owns every background task of the object;
2. when the block ends — normally, by an exception, or cancelled from
   outside — the object's close step runs, shielded, while the task group is
   still open, so that the tasks it waits for can finish;
3. the block's body runs in a cancel scope that :meth:`Lifetime.request_close`
   cancels: any task may ask, and the owner's ``async with`` then finishes
   cleanly (the body's own cancellation ends there, it is not an error).

An exception that leaves the body is re-raised as it is, after the close
step, not wrapped into an exception group by the task group.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType

import anyio
import anyio.abc


class _Held:
    """Between the body and the task group: keeps the body's exception from
    the task group (which would wrap it) until the stack has unwound."""

    def __init__(self) -> None:
        self.exc: BaseException | None = None

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.exc = exc
        return exc is not None


class Lifetime:
    """One owner's ``async with``: see the module docstring.

    ``close`` is the object's close step; it must be safe to call more than
    once and from any task (it is also the object's public ``close()``).
    """

    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close = close
        self._stack: AsyncExitStack | None = None
        self._body = anyio.CancelScope()
        self._held = _Held()
        self._owner_task: int | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.close_requested = False

    async def enter(self, task_group: anyio.abc.TaskGroup | None = None) -> anyio.abc.TaskGroup:
        """Open the lifetime; background tasks go to ``task_group`` if given
        (a caller's, which then outlives this object), else to a new one."""
        if self._stack is not None:
            raise RuntimeError("already entered")
        stack = AsyncExitStack()
        try:
            tg = task_group
            if tg is None:
                tg = await stack.enter_async_context(anyio.create_task_group())
            stack.push_async_callback(self._close_shielded)
            stack.enter_context(self._held)
            stack.enter_context(self._body)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._tg = tg
        self._owner_task = anyio.get_current_task().id
        if self.close_requested:
            self._body.cancel()
        return tg

    async def exit(
        self, typ: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Close the object and leave the block: the owner's ``__aexit__``
        returns what this returns (True: the body's exception was the
        cancellation :meth:`request_close` made, and ends here); the body's
        own exception is raised again, as it is."""
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        suppressed = await stack.__aexit__(typ, exc, tb)
        held, self._held.exc = self._held.exc, None
        if held is not None:
            raise held
        return bool(suppressed)

    async def abort(self) -> None:
        """Undo :meth:`enter` when the rest of the owner's start-up failed."""
        await self.exit(None, None, None)

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None or self._stack is None:
            raise RuntimeError("not running: use 'async with'")
        return self._tg

    @property
    def running(self) -> bool:
        return self._stack is not None

    def request_close(self) -> None:
        """Ask the owner's ``async with`` to finish (from any task, at once)."""
        self.close_requested = True
        self._body.cancel()

    def from_owner(self) -> bool:
        """Whether the calling task is the one that entered the block."""
        return self._owner_task is not None and anyio.get_current_task().id == self._owner_task

    async def _close_shielded(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._close()
