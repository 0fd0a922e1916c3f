"""Tango's callbacks: when a job ends, its output file is POSTed to the URL
the job named (multipart, field ``file``, header ``Filename``), with retries
and backoff, in the background."""

from __future__ import annotations

import logging
import os

import aiohttp
import anyio
import anyio.to_thread

from .config import ServerConfig
from .store import SQLiteStore

log = logging.getLogger("vmpool.server")


class Callbacks:
    """Sends callbacks over one HTTP client; counts what was sent and what failed."""

    def __init__(self, config: ServerConfig, store: SQLiteStore,
                 http: aiohttp.ClientSession) -> None:
        self.config = config
        self.store = store
        self.http = http
        self.sent = 0
        self.failed = 0

    async def send(self, job_id: int, url: str, output_file: str) -> None:
        name = os.path.basename(output_file)
        delay = self.config.callback_backoff
        for attempt in range(1, self.config.callback_tries + 1):
            try:
                data = await anyio.Path(output_file).read_bytes()
                form = aiohttp.FormData()
                form.add_field("file", data, filename=name,
                               content_type="application/octet-stream")
                timeout = aiohttp.ClientTimeout(total=self.config.callback_timeout)
                async with self.http.post(url, data=form, headers={"Filename": name},
                                          timeout=timeout) as resp:
                    if resp.status < 500:
                        self.sent += 1
                        await anyio.to_thread.run_sync(self.store.callback_done, job_id)
                        log.info("callback for job %s to %s: HTTP %s", job_id, url, resp.status)
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
            log.warning("callback for job %s to %s failed (try %d/%d): %s", job_id, url,
                        attempt, self.config.callback_tries, problem)
            if attempt < self.config.callback_tries:
                await anyio.sleep(delay)
                delay *= 2
        self.failed += 1
        await anyio.to_thread.run_sync(self.store.callback_done, job_id)
