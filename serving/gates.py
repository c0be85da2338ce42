"""The one plain-ASGI layer every request passes before a route (`Gate`): Host and Origin checks (CORS for allowed
origins), the API key and its throttle, reading the body (size limit, deadline, client gone), security headers on
every response, and request metrics.

One layer doing all of it in one pass, rather than a chain of five: each layer of a chain wrapped `send`, re-read
the headers and added its own awaits, and together they took about 100 us of CPU per request on a 2-core machine,
an eighth of what a short prediction took in all (BENCHMARKS.md, issue 35). Plain ASGI rather than FastAPI's @app.middleware("http"), whose
per-request task and stream plumbing measurably cut throughput, and outside FastAPI so that nothing a client does
reaches Starlette's error handler (which answers 500 to any exception, even after a response has started).
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import hmac
import ipaddress
import logging
import math
import time
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from prometheus_client import Counter, Histogram
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
log = logging.getLogger("serving.requests")
# Probes (a load balancer's, Kubernetes') send whatever Host they like and carry no key; they reveal nothing.
OPEN_ROUTES = {"/healthz", "/readyz"}
# The playground is a static page: it stays reachable without the API key, and asks for the key itself
# when the data it fetches (/v1/model, /v1/predict) needs one.
PLAYGROUND = {"/", "/static/playground.js", "/static/playground.css"}
KEYLESS_ROUTES = OPEN_ROUTES | PLAYGROUND
# Metrics are labelled by these paths only, so random URLs cannot blow up the label set.
ROUTES = {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"} | PLAYGROUND


def _named_route(path: str) -> str:
    """The metrics label of a named model's route (`--model NAME=SOURCE`): the route, not the name, so random
    names cannot grow the label set."""
    if path == "/v1/models":
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}/predict" if path.endswith("/predict") else "/v1/models/{name}"
    return "other"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Every HTML page runs this server's script files and nothing else: no inline script, no eval, nothing fetched
# from elsewhere, never framed. A name or label that reached a page as markup could still run nothing.
_COMMON_POLICY = ("script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                  "frame-ancestors 'none'")
PAGE_POLICY = f"default-src 'self'; img-src 'self' data:; {_COMMON_POLICY}"
"""The playground's policy, and any other HTML response's that sets none (an error page)."""
# Swagger UI and ReDoc set inline styles (ReDoc's styled-components writes <style> elements) and ReDoc runs its
# search index in a Worker made from a blob of its own bundle; scripts stay this server's files only.
DOCS_POLICY = (f"default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               f"worker-src 'self' blob:; {_COMMON_POLICY}")
"""The policy of /docs and /redoc."""


def client_key(host: str | None) -> str:
    """Whom a connection or a wrong key counts against: the client's IP address; for IPv6 its /64, which one host
    is commonly given whole (so it cannot pose as many clients by changing the low bits)."""
    if not host:
        return "-"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a Unix socket path or a name: one client
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class RateLimitedLog:
    """One log line per second at most: a flood of refusals must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.last, self.suppressed = logger, 0.0, 0

    def __call__(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            self.suppressed += 1
            return
        more = f" (and {self.suppressed} more in the last second)" if self.suppressed else ""
        self.last, self.suppressed = now, 0
        self.logger.info(message + more, *args)


def _reply(status: int, detail, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def client_gone(scope, when: str) -> JSONResponse:
    """The response to give once the client has disconnected: uvicorn writes nothing of it, but the status
    (499) is what the gate counts and logs, with `when` it went."""
    scope.setdefault("state", {})["gone"] = when
    return _reply(CLIENT_CLOSED, "client closed the connection")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(lower-case host name, port or None) of a Host header or an origin's netloc; None when malformed."""
    try:
        parts = urlsplit("//" + value)
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return (f"[{name}]" if ":" in name else name), port


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Loopback names, and the address the server was told to bind (IPv6 in brackets, as in a Host header)."""
    given = f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host
    return list(dict.fromkeys([*LOOPBACK_NAMES, given.lower()]))


def check_allowed_origins(origins: Iterable[str]) -> list[str]:
    """The --allowed-origins entries, each `*` or scheme://host[:port]; ValueError naming a malformed one."""
    checked = []
    for origin in origins:
        try:
            parts = urlsplit(origin)
            parts.port  # raises for a port that is not a number
        except ValueError:
            parts = None
        if origin != "*" and (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                              or parts.path or parts.query or parts.fragment or parts.username is not None):
            raise ValueError(f"--allowed-origins {origin!r}: expected * or an origin such as https://app.example.com "
                             f"or http://localhost:3000 (scheme, host and optional port, nothing else)")
        checked.append(origin.lower())
    return checked


class KeyThrottle:
    """Wrong API keys, counted per client (`client_key`): the first FREE_FAILURES are answered 401; each one after
    shuts the client out for twice as long as the last (1 s, 2 s, 4 s ... at most MAX_LOCKOUT_S), and while shut
    out its requests get 429 with Retry-After and no key is compared, so guessing gains nothing. A right key
    clears the count; a client with no wrong key for FORGET_S is forgotten. Other clients are never slowed."""

    FREE_FAILURES = 5
    MAX_LOCKOUT_S = 300.0
    FORGET_S = 900.0
    MAX_CLIENTS = 10_000  # the least recently failing are forgotten first, so memory stays bounded

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        # client -> (wrong keys so far, shut out until, last wrong key)
        self.clients: collections.OrderedDict[str, tuple[int, float, float]] = collections.OrderedDict()

    def retry_after(self, client: str) -> float:
        """Seconds this client is still shut out (0 when it may try a key)."""
        entry = self.clients.get(client)
        if entry is None:
            return 0.0
        failures, until, last = entry
        now = self.clock()
        if now - last > self.FORGET_S:
            del self.clients[client]
            return 0.0
        return max(0.0, until - now)

    def failed(self, client: str) -> float:
        """Count a wrong key; returns the seconds the client is now shut out for (0 while it has free tries)."""
        now = self.clock()
        failures, _, last = self.clients.pop(client, (0, 0.0, now))
        failures = failures + 1 if now - last <= self.FORGET_S else 1
        lockout = 0.0 if failures < self.FREE_FAILURES else \
            min(self.MAX_LOCKOUT_S, 2.0 ** (failures - self.FREE_FAILURES))
        self.clients[client] = (failures, now + lockout, now)
        while len(self.clients) > self.MAX_CLIENTS:
            self.clients.popitem(last=False)
        return lockout

    def succeeded(self, client: str) -> None:
        self.clients.pop(client, None)




def _set_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> None:
    """Replace every `name` header (lower-case) of a raw ASGI header list with one holding `value`."""
    headers[:] = [(k, v) for k, v in headers if k.lower() != name]
    headers.append((name, value))


def secure_headers(message: dict) -> None:
    """Security headers on a response start: `nosniff` (a JSON answer carrying a model's name is never sniffed into
    HTML), and on an HTML one a Content-Security-Policy (the route's own, else PAGE_POLICY) and no framing."""
    headers = list(message.get("headers", ()))
    _set_header(headers, b"x-content-type-options", b"nosniff")
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if content_type.lower().startswith(b"text/html"):
        if not any(k.lower() == b"content-security-policy" for k, _ in headers):
            headers.append((b"content-security-policy", PAGE_POLICY.encode()))
        _set_header(headers, b"x-frame-options", b"DENY")
        _set_header(headers, b"referrer-policy", b"no-referrer")
    message["headers"] = headers


class Gate:
    """Everything a request passes before its route, in one ASGI layer and one pass, in this order:

    1. Host and Origin: Hosts not allowed (DNS rebinding against a loopback server) get 400, cross-origin requests
       from origins not allowed (a web page making a visitor's browser call the service) 403. Same-origin requests
       (a page served by this server calling it) always pass: their Origin names the Host they were sent to.
       Allowed cross-origin callers get CORS headers (Starlette's CORSMiddleware), so browsers let them read the
       answers. Probes (OPEN_ROUTES) skip the Host and Origin checks.
    2. The API key, when one is set: every route but KEYLESS_ROUTES needs X-API-Key: KEY or Authorization: Bearer
       KEY; wrong keys are throttled per client (KeyThrottle).
    3. The body, read whole before the route runs: over `max_body_bytes` gets 413 (whether Content-Length says so
       or a chunked upload gets there), not all of it within `body_timeout` seconds gets 408, and a client that
       disconnects meanwhile is recorded as gone (499), never as an error of ours. The route then reads the body
       from memory; after it, `receive` is the client's again (so a route can notice the client leave while it
       waits for an answer).
    4. The route: `direct(scope)`, an ASGI callable for the hot routes that need no router (the server's predict
       routes), else `app`.

    Around all of it: security headers on every response (`secure_headers`), request counts and latency by route
    and status, one log line per client that went away (499), and a 500 of ours for a bug (never a crash).

    Each part is off when its setting is None: `Gate(app)` alone adds the security headers only.
    """

    def __init__(self, app: ASGIApp, *, requests: Counter | None = None, latency: Histogram | None = None,
                 allowed_hosts: list[str] | None = None, allowed_origins: Iterable[str] = (),
                 api_key: str | None = None, throttle: KeyThrottle | None = None, max_body_bytes: int | None = None,
                 body_timeout: float | None = None, direct: Callable[[dict], ASGIApp | None] | None = None):
        self.app, self.direct = app, direct
        self.requests, self.latency = requests, latency
        # prometheus_client's labels() looks the child up under a lock on every call; the label sets are bounded
        # (ROUTES, a few statuses), so each child is looked up once.
        self._counters: dict[tuple[str, int], Any] = {}
        self._latencies: dict[str, Any] = {}
        self.hosts = [h.lower() for h in allowed_hosts] if allowed_hosts is not None else None
        # (name or fnmatch pattern, port or None) of each allowed Host; malformed entries allow nothing.
        self._allowed = [(h, None) if h.startswith("*") else _split_host(h) for h in self.hosts or []]
        # Host header value -> (its name and port, or None when malformed; whether it is allowed): clients send a
        # handful of values, and parsing one costs more than the rest of the check. Bounded, as values are the
        # client's to choose.
        self._host_verdicts: dict[bytes, tuple[tuple[str, int | None] | None, bool]] = {}
        self.origins = list(allowed_origins)
        self.any_origin = "*" in self.origins
        self.cors = CORSMiddleware(self._keyed, allow_origins=self.origins, allow_methods=["GET", "POST"],
                                   allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                                   max_age=600) if self.origins else None
        self.key = api_key.encode() if api_key else None
        self.throttle = throttle or KeyThrottle()
        self.refused_log = RateLimitedLog(log)
        self.limit, self.timeout = max_body_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500, False]  # the status sent, and whether a response has started

        async def send_secured(message):
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
                secure_headers(message)
            await send(message)

        try:
            await self._guarded(scope, receive, send_secured)
        except Exception:  # a bug must not take the server down; report it as ours
            log.exception("unhandled error on %s", scope["path"])
            if not status[1]:
                await _reply(500, "internal error")(scope, receive, send_secured)
        finally:
            self._record(scope, status[0], time.perf_counter() - started)

    def _record(self, scope, code: int, elapsed: float) -> None:
        path = scope["path"]
        if code == CLIENT_CLOSED:
            client = scope.get("client")
            log.info("%s %s %s 499 client closed the connection %s (after %.2f s)",
                     f"{client[0]}:{client[1]}" if client else "-", scope["method"], path,
                     scope.get("state", {}).get("gone", ""), elapsed)
        if self.requests is None:
            return
        route = path if path in ROUTES else _named_route(path)
        counter = self._counters.get((route, code))
        if counter is None:
            counter = self._counters[(route, code)] = self.requests.labels(route, str(code))
        counter.inc()
        if self.latency is not None:
            histogram = self._latencies.get(route)
            if histogram is None:
                histogram = self._latencies[route] = self.latency.labels(route)
            histogram.observe(elapsed)

    # 1. Host and Origin ------------------------------------------------------------------------------------------

    async def _guarded(self, scope, receive, send):
        if self.hosts is not None and scope["path"] not in OPEN_ROUTES:
            hosts = [v for k, v in scope["headers"] if k == b"host"]
            if len(hosts) != 1:
                detail = "no Host header" if not hosts else "more than one Host header"
                return await _reply(400, f"{detail}; send exactly one")(scope, receive, send)
            host, allowed = self._host_verdict(hosts[0])
            if not allowed:
                host_value = hosts[0].decode("latin-1")
                return await _reply(400, f"Host {host_value!r} is not allowed (allowed: {', '.join(self.hosts)}); "
                                         f"start the server with --allowed-hosts to add it")(scope, receive, send)
            origins = [v for k, v in scope["headers"] if k == b"origin"]
            if origins:
                origin = origins[-1].decode("latin-1").lower()
                if len(origins) > 1 or not (self._same_origin(origin, host) or self.any_origin or origin in self.origins):
                    return await _reply(403, f"cross-origin request from Origin {origin!r} refused; "
                                             f"allow it with --allowed-origins")(scope, receive, send)
        if self.cors is not None:
            # Starlette's CORS answers preflights itself and adds its headers to answers; requests without an Origin
            # pass through it untouched.
            return await self.cors(scope, receive, send)
        await self._keyed(scope, receive, send)

    def _host_verdict(self, value: bytes) -> tuple[tuple[str, int | None] | None, bool]:
        verdict = self._host_verdicts.get(value)
        if verdict is None:
            host = _split_host(value.decode("latin-1"))
            verdict = (host, host is not None and self._host_allowed(*host))
            if len(self._host_verdicts) >= 1024:
                self._host_verdicts.clear()
            self._host_verdicts[value] = verdict
        return verdict

    def _host_allowed(self, name: str, port: int | None) -> bool:
        for allowed in self._allowed:
            if allowed is None:
                continue
            want_name, want_port = allowed
            if want_name == "*":
                return True
            if (fnmatch.fnmatchcase(name, want_name) if "*" in want_name else name == want_name) \
                    and (want_port is None or want_port == port):
                return True
        return False

    @staticmethod
    def _same_origin(origin: str, host: tuple[str, int | None]) -> bool:
        try:
            parts = urlsplit(origin)
        except ValueError:  # e.g. "http://[::1"
            return False
        if parts.scheme not in ("http", "https") or parts.path:
            return False  # includes "null" (sandboxed frames, file: pages)
        split = _split_host(parts.netloc)
        if split is None:
            return False
        name, port = split
        port = port or (443 if parts.scheme == "https" else 80)
        # The Host header carries no scheme (a TLS proxy may sit in front), so its port, when absent, can be
        # either default.
        return name == host[0] and (port == host[1] if host[1] is not None else port in (80, 443))

    # 2. The API key ----------------------------------------------------------------------------------------------

    async def _keyed(self, scope, receive, send):
        if self.key is not None and scope["path"] not in KEYLESS_ROUTES and scope["method"] != "OPTIONS":
            refusal = self._key_refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self._with_body(scope, receive, send)

    def _key_refusal(self, scope) -> JSONResponse | None:
        """None when the request carries the key; else the 401 or 429 to answer."""
        client = client_key((scope.get("client") or (None, None))[0])
        wait = self.throttle.retry_after(client)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            return _reply(429, f"too many wrong API keys from this address; try again in {seconds} s",
                          headers={"Retry-After": str(seconds)})
        given, why = self._given(scope)
        if given is not None and hmac.compare_digest(given, self.key):
            self.throttle.succeeded(client)
            return None
        if given is not None:  # a key was tried (a missing or malformed header guesses nothing)
            lockout = self.throttle.failed(client)
            if lockout > 0:
                self.refused_log("%s: %d wrong API keys; its requests get 429 for %g s", client,
                                 self.throttle.clients[client][0], lockout)
        return _reply(401, f"{why or 'wrong API key'} (send X-API-Key: KEY or Authorization: Bearer KEY)",
                      headers={"WWW-Authenticate": "Bearer"})

    @staticmethod
    def _given(scope) -> tuple[bytes | None, str]:
        headers = dict(scope["headers"])
        if b"x-api-key" in headers:
            return headers[b"x-api-key"].strip(b" \t"), ""
        value = headers.get(b"authorization")
        if value is None:
            return None, "missing API key"
        # RFC 7235: the scheme is case-insensitive and separated from the credentials by spaces.
        scheme, _, token = value.strip(b" \t").partition(b" ")
        token = token.strip(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None, "the Authorization header must be 'Bearer KEY'"
        return token, ""

    # 3. The body, then 4. the route ------------------------------------------------------------------------------

    async def _with_body(self, scope, receive, send):
        route = (self.direct and self.direct(scope)) or self.app
        if self.limit is None:
            return await route(scope, receive, send)
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared and (not declared[0].isdigit() or int(declared[0]) > self.limit):
            return await self._too_big()(scope, receive, send)  # refused before reading it (no 100 Continue either)
        chunks, seen = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return await client_gone(scope, "during the request body")(scope, receive, send)
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > self.limit:
                        return await self._too_big()(scope, receive, send)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            log.info("%s %s 408 body not received within %g s (%d bytes so far)", scope["method"], scope["path"],
                     self.timeout, seen)
            return await _reply(408, f"the request body did not arrive within {self.timeout:g} s")(scope, receive, send)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await route(scope, replay, send)

    def _too_big(self) -> JSONResponse:
        return _reply(413, f"request body over {self.limit} bytes")


# The name of the layer that set the security headers before the gate did it all; `PageHeaders(app)` is `Gate(app)`.
PageHeaders = Gate
