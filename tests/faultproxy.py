"""A fault-injecting TCP proxy for tests: put it in front of a server on 127.0.0.1 and switch faults on.

    with FaultProxy("http://127.0.0.1:5000") as proxy:   # the upstream server's URL or (host, port)
        options = {..., "client_kwargs": {"endpoint_url": proxy.url}}
        proxy.set_mode("refuse", for_s=10)               # an outage of 10 s, then "pass" again
        ...

Modes (switchable at any time from the test's thread):

- ``pass``: bytes are forwarded both ways unchanged.
- ``refuse``: nothing listens on the port any more, so connecting fails with ECONNREFUSED.
- ``reset``: connections are accepted, then reset at once (TCP RST).
- ``delay``: each new connection waits ``delay_s`` before it is forwarded (a slow or frozen server).
- ``http_503``: every HTTP request is answered ``503 Slow Down`` with S3's ``SlowDown`` XML error.

Switching mode resets every open connection (as a restarting server would), so pooled keep-alive
connections meet the fault too. ``set_mode(..., for_s=...)`` switches back to ``pass`` by itself.
The proxy is bounded: it stops by itself after ``lifetime_s`` seconds, runs in one daemon thread
and serves only 127.0.0.1. ``counts`` tells how many connections each mode handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

MODES = ("pass", "refuse", "reset", "delay", "http_503")
_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>"
)
_MAX_HEAD = 64 * 1024


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (a free port) in front of ``upstream``; see the module docstring."""

    def __init__(self, upstream: str | tuple[str, int], *, lifetime_s: float = 300.0) -> None:
        if isinstance(upstream, str):
            parts = urlsplit(upstream)
            upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.upstream = upstream
        self.lifetime_s = lifetime_s
        self.mode = "pass"
        self.delay_s = 0.0
        self.counts: Counter[str] = Counter()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._revert: asyncio.TimerHandle | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control (called from the test's thread) ----------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        self._loop.call_soon_threadsafe(self._loop.call_later, self.lifetime_s, self._stop_soon)
        return self

    def set_mode(self, mode: str, *, for_s: float | None = None, delay_s: float = 5.0) -> None:
        """Switch to ``mode`` now (resetting open connections); back to ``pass`` after ``for_s`` s."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        self._call(self._switch(mode, for_s, delay_s))

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError, TimeoutError):
                self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # -- inside the proxy's event loop -------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is None and not self._stopped:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def _switch(self, mode: str, for_s: float | None, delay_s: float) -> None:
        if self._revert is not None:
            self._revert.cancel()
            self._revert = None
        self.mode, self.delay_s = mode, delay_s
        self._reset_all()
        if mode == "refuse" and self._server is not None:
            self._server.close()  # the port stops listening: connect() is refused by the kernel
            self._server = None
        elif mode != "refuse":
            await self._listen()
        if for_s is not None:
            self._revert = self._loop.call_later(
                for_s, lambda: self._loop.create_task(self._switch("pass", None, 0.0))
            )

    def _stop_soon(self) -> None:
        self._loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        self._stopped = True
        if self._revert is not None:
            self._revert.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._reset_all()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _reset_all(self) -> None:
        for writer in list(self._connections):
            _reset(writer)
        self._connections.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        self.counts[mode] += 1
        self._connections.add(writer)
        try:
            if mode == "reset":
                _reset(writer)
            elif mode == "http_503":
                await _answer_slow_down(reader, writer)
            else:
                if mode == "delay":
                    await asyncio.sleep(self.delay_s)
                await self._forward(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            _reset(writer)
        finally:
            self._connections.discard(writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._connections.add(up_writer)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._connections.discard(up_writer)
            up_writer.close()
            writer.close()


async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    """Copy bytes until end of file, then half-close the target (HTTP keep-alive works through it)."""
    try:
        while chunk := await source.read(65536):
            target.write(chunk)
            await target.drain()
        if target.can_write_eof():
            target.write_eof()
    except OSError:
        _reset(target)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), as a crashed or restarting server does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _answer_slow_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one HTTP request and answer S3's throttling reply, then close the connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    if len(head) > _MAX_HEAD:
        raise OSError("request head too long")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if k}
    if headers.get("expect", "").lower() != "100-continue":
        length = int(headers.get("content-length", "0") or 0)
        if length:
            await asyncio.wait_for(reader.readexactly(length), timeout=10)
    body = b"" if lines[0].startswith("HEAD ") else _SLOW_DOWN_BODY
    writer.write(
        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        + f"Content-Length: {len(_SLOW_DOWN_BODY)}\r\n".encode()
        + b"x-amz-request-id: faultproxy\r\nConnection: close\r\n\r\n"
        + body
    )
    await writer.drain()
    writer.close()
