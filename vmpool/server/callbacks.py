"""Tango's callbacks: when a job ends, its output file is POSTed to the URL
the job named (multipart, field ``file``, header ``Filename``), with retries
and backoff, in the background.

Autolab reads the upload only (``params[:file].read`` in its
``autograde_done`` action), never the ``Filename`` header; the header
carries the output file's name percent-encoded wherever it has a character
outside printable ASCII, so that no name can make a header the HTTP client
refuses. :meth:`Callbacks.send` is the task's error boundary: whatever
happens, the callback ends as sent, failed or errored, is counted, and is
marked done in the store, so that a restart never resends it forever.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp
import anyio

from .config import ServerConfig

log = logging.getLogger("vmpool.server")

#: printable ASCII but '%': left as they are in a header value
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_value(name: str) -> str:
    """``name`` as an HTTP header value that no client or server refuses:
    every character outside printable ASCII, and '%', percent-encoded
    (RFC 3986, UTF-8; a lone surrogate too). Plain names are unchanged."""
    return quote(name, safe=_HEADER_SAFE, errors="surrogatepass")


def callback_delays(config: ServerConfig) -> list[float]:
    """The pauses between the tries of one callback."""
    delays, delay = [], config.callback_backoff
    for _ in range(config.callback_tries - 1):
        delays.append(min(delay, config.callback_backoff_max))
        delay *= 2
    return delays


def tls_context(config: ServerConfig) -> ssl.SSLContext | bool:
    """What https callbacks verify against (aiohttp's ``ssl=``)."""
    if not config.callback_verify_tls:
        return False
    return ssl.create_default_context(cafile=config.callback_ca_file)


class Callbacks:
    """Sends callbacks over one HTTP client; counts what was sent and what failed."""

    def __init__(self, config: ServerConfig, mark_done: Callable[[int], Awaitable[object]],
                 http: aiohttp.ClientSession) -> None:
        self.config = config
        #: records in the store that a job's callback is over (through the
        #: server's store thread, as every store call)
        self.mark_done = mark_done
        self.http = http
        self.tls = tls_context(config)
        #: delivered (any answer below 500)
        self.sent = 0
        #: given up after every try (connection errors, 5xx, timeouts)
        self.failed = 0
        #: refused for TLS (the certificate was not verified): not retried
        self.tls_refused = 0
        #: ended by an unexpected exception (a bug): caught here, not retried
        self.errors = 0
        self._tls_hint_logged = False

    async def send(self, job_id: int, url: str, output_file: str) -> None:
        """Deliver one callback; the error boundary of its task.

        Cancellation (shutdown) leaves it pending in the store: it is sent
        at the next start. Any other end marks it done.
        """
        try:
            await self._deliver(job_id, url, output_file)
        except Exception as e:
            self.errors += 1
            log.exception("callback for job %s to %s: unexpected error, not sent (%s: %s)",
                          job_id, url, type(e).__name__, e)
        try:
            await self.mark_done(job_id)
        except Exception:
            log.exception("callback for job %s: could not mark it done", job_id)

    async def _deliver(self, job_id: int, url: str, output_file: str) -> None:
        name = header_value(os.path.basename(output_file))
        delays = callback_delays(self.config)
        for attempt in range(1, self.config.callback_tries + 1):
            try:
                data = await anyio.Path(output_file).read_bytes()
                form = aiohttp.FormData()
                form.add_field("file", data, filename=name,
                               content_type="application/octet-stream")
                timeout = aiohttp.ClientTimeout(total=self.config.callback_timeout)
                async with self.http.post(url, data=form, headers={"Filename": name},
                                          timeout=timeout, ssl=self.tls) as resp:
                    if resp.status < 500:
                        self.sent += 1
                        log.info("callback for job %s to %s: HTTP %s", job_id, url, resp.status)
                        return
                    problem = f"HTTP {resp.status}"
            except aiohttp.ClientConnectorCertificateError as e:
                # not retried: the same certificate is refused again
                self._tls_refused(job_id, url, e)
                return
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
            log.warning("callback for job %s to %s failed (try %d/%d): %s", job_id, url,
                        attempt, self.config.callback_tries, problem)
            if attempt < self.config.callback_tries:
                await anyio.sleep(delays[attempt - 1])
        self.failed += 1
        log.warning("callback for job %s to %s: given up after %d tries", job_id, url,
                  self.config.callback_tries)

    def _tls_refused(self, job_id: int, url: str, e: Exception) -> None:
        self.tls_refused += 1
        if not self._tls_hint_logged:
            self._tls_hint_logged = True
            log.error("callback for job %s to %s refused for TLS: %s. Set server.callback_ca_file"
                      " to the CA (PEM) of that server's certificate, or, to verify nothing as"
                      " Tango does, server.callback_verify_tls = false", job_id, url, e)
        else:
            log.warning("callback for job %s to %s refused for TLS: %s", job_id, url, e)
