"""Connection-level limits uvicorn does not have: caps on open connections (in all, and from one client, so that one
client cannot hold them all), a deadline and a size cap on the request head, and a bound on how long a client may
stall reading a response.

uvicorn bounds only the idle time between requests (`timeout_keep_alive`, reset by every byte received), and
httptools has no limit on the size of a request head, so a client trickling a head one byte at a time, or
sending an endless one, held a connection (and memory) for as long as it liked; ASGI middleware cannot help,
as it runs only once the head is complete. So this subclasses uvicorn's httptools protocol (a declared
dependency, and what uvicorn picks by default when it is installed) and hooks its parser callbacks. It relies
on uvicorn internals (pinned in constraints.txt); tests/test_serving_hardening.py exercises every hook.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.gates import RateLimitedLog, client_key

log = logging.getLogger("serving.connections")
MAX_HEAD_BYTES = 32 * 1024  # request line and headers; nginx's default buffers hold 32 KB, h11's 16 KB


def _raw_response(status: str, reason: str, extra: bytes = b"") -> bytes:
    body = reason.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n").encode() + extra + b"\r\n" + body


def guarded_protocol(max_connections: int, header_timeout: float, send_timeout: float,
                     max_client_connections: int | None = None) -> type[asyncio.Protocol]:
    """An httptools protocol class for uvicorn's `http=` with these limits.

    max_connections: connections open at once; the next one gets 503 and is closed at once.
    max_client_connections: connections open at once from one client (`serving.gates.client_key`: an IP address,
    an IPv6 /64), so that one client cannot hold them all; the next one gets 503 and is closed. None: no cap
    beyond max_connections.
    header_timeout: seconds from connecting (or from the first byte of the next request on a kept-alive
    connection) until the request head is complete; a late head gets 408, an idle connection is closed.
    Also bounds the rest of a request body nobody reads any more (after an early 413, 401 or 408).
    send_timeout: seconds a client may leave the response unread with our send buffer full; then the
    connection is dropped.
    """
    refused_log = RateLimitedLog(log)
    per_client = max_client_connections if max_client_connections and max_client_connections < max_connections \
        else None
    open_by_client: collections.Counter[str] = collections.Counter()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _in_head = False
        _head_bytes = 0
        _counted_as: str | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                refused_log("refused a connection from %s: %d open, the limit (--max-connections)",
                            self._peer(), max_connections)
                self._refuse("503 Service Unavailable", f"busy: {max_connections} connections are open; retry shortly\n",
                             b"retry-after: 1\r\n")
                return
            if per_client is not None:
                client = client_key(self.client[0] if self.client else None)
                if open_by_client[client] >= per_client:
                    refused_log("refused a connection from %s: %d open from %s, the limit (--max-client-connections)",
                                self._peer(), per_client, client)
                    self._refuse("503 Service Unavailable", f"busy: {per_client} connections from your address are "
                                 "open, the most one client may hold; close some or retry shortly\n", b"retry-after: 1\r\n")
                    return
                open_by_client[client] += 1
                self._counted_as = client
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timers()
            if self._counted_as is not None:
                open_by_client[self._counted_as] -= 1
                if open_by_client[self._counted_as] <= 0:
                    del open_by_client[self._counted_as]
                self._counted_as = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                # Everything received while the head is still incomplete is head (at most one earlier read
                # may also hold the end of a previous request): httptools buffers a header internally until
                # it is complete, so the size is counted here rather than in its callbacks.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    log.info("%s sent a request head over %d bytes: 431", self._peer(), MAX_HEAD_BYTES)
                    self._refuse("431 Request Header Fields Too Large",
                                 f"the request line and headers are over {MAX_HEAD_BYTES} bytes\n")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            if self._head_timer is None:
                self._arm_head_deadline()

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Answered before its body was all read (413, 401, 408): the rest is parsed and dropped, but only
            # for as long as a head may take, so a client trickling it cannot hold the connection.
            if self.cycle is not None and self.cycle.more_body and self._head_timer is None \
                    and not self.transport.is_closing():
                self._arm_head_deadline()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(send_timeout, self._send_stalled)

        def resume_writing(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            super().resume_writing()

        def _arm_head_deadline(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A request is being answered (the late head is a pipelined next one): close after that answer
                # rather than write into the middle of it.
                self.cycle.keep_alive = False
                return
            if self._in_head:
                log.info("%s did not send a complete request head within %g s (--header-timeout): 408",
                         self._peer(), header_timeout)
                self._refuse("408 Request Timeout", f"the request head did not arrive within {header_timeout:g} s\n")
            else:  # idle since connecting, or trickling a body nobody reads
                self.transport.close()

        def _send_stalled(self) -> None:
            self._send_timer = None
            log.info("%s left the response unread for %g s (--body-timeout): connection dropped",
                     self._peer(), send_timeout)
            # abort, not close: close would wait for the unread buffer to drain first.
            self.transport.abort()

        def _refuse(self, status: str, reason: str, extra: bytes = b"") -> None:
            self.transport.write(_raw_response(status, reason, extra))
            self.transport.close()

        def _cancel_timers(self) -> None:
            for timer in (self._head_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._send_timer = None

        def _peer(self) -> str:
            return "%s:%d" % self.client if self.client else "a client"

    return GuardedHttpToolsProtocol
