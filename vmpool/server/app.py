"""Running the server: its manager, background work and HTTP listener, each
owned by one ``async with``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
from aiohttp import web

from ..manager import new_owner
from ..registry import driver_factory
from ..vmms import safe_name
from .config import ServerConfig
from .recovery import recover
from .routes import TangoServer
from .store import SQLiteStore

log = logging.getLogger("vmpool.server")


@contextlib.asynccontextmanager
async def running(config: ServerConfig) -> AsyncIterator[TangoServer]:
    """The server with its manager entered and its background work owned;
    leaving abandons running jobs (they run again at the next start)."""
    store = SQLiteStore(config.database)
    server: TangoServer | None = None
    try:
        server = TangoServer(config, store, owner=server_owner(config))
        # The task group is innermost: cancelling it at the end must not
        # cancel the session's close (an await in a cancelled scope), whose
        # CancelledError would take the place of the body's own exception
        # and be swallowed by the group: a failed start would exit quietly.
        async with (
            server.manager,
            aiohttp.ClientSession() as http,
            anyio.create_task_group() as tg,
        ):
            server.start(tg, http)
            try:
                yield server
            finally:
                server.stop()
                tg.cancel_scope.cancel()
    finally:
        if server is not None:
            await anyio.to_thread.run_sync(server.close_store)
        store.close()


def server_owner(config: ServerConfig) -> str | None:
    """The server's owner id, kept in ``<database>.owner``: the same one
    after every restart, so that the next start finds (and, its earlier
    process being gone, removes) what a crash left. None for a database
    that is not a file (a fresh id each time)."""
    if not config.database or config.database == ":memory:" or config.database.startswith(
        "file:"
    ):
        return None
    path = Path(f"{config.database}.owner")
    try:
        owner = path.read_text().strip()
    except FileNotFoundError:
        owner = ""
    if owner and safe_name(owner) == owner:
        return owner
    owner = new_owner(config.settings.prefix)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the server's own
    with os.fdopen(fd, "w") as f:
        f.write(f"{owner}\n")
    os.replace(tmp, path)
    return owner


async def serve(
    config: ServerConfig,
    *,
    ready: Callable[[int], None] | None = None,
    stop: anyio.Event | None = None,
) -> None:
    """Run the server until ``stop`` is set (or forever); ``ready(port)`` once listening."""
    async with running(config) as server:
        # Drivers whose configuration can be wrong in ways only their service
        # can tell (credentials, region, images) are checked now: the server
        # does not start, saying why, rather than fail every job later.
        for name in config.settings.driver_options:
            if getattr(driver_factory(name), "checked_at_start", False):
                await server.manager.driver(name)
        # Recover before listening: a job added meanwhile would be found
        # unfinished in the store and submitted a second time.
        rerun, complete = await recover(server)
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
            port = _bound_port(site, config.port)
            log.info("vmpool serving on %s:%s (%d jobs rerun, %d found complete)",
                     config.host, port, rerun, complete)
            if ready is not None:
                ready(port)
            if stop is None:
                await anyio.sleep_forever()
            else:
                await stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()


def _bound_port(site: web.TCPSite, default: int) -> int:
    """The port actually bound (``port = 0`` asks the OS for a free one)."""
    srv: Any = site._server
    sockets = getattr(srv, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else default
