"""Loopback HTTP servers (127.0.0.1 only) standing in for a STAC API and Earth Engine.

Real clients (pystac-client, GDAL's /vsicurl/, odc-stac, earthengine-api) talk to them over real
HTTP. Every request is logged; faults can be injected: drop every k-th connection without an
answer, answer every m-th request with 429, or fail everything with 503 after a budget.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Faults:
    """Fault injection, counted over every request the server receives.

    Attributes:
        drop_every: drop the connection (TCP reset, no answer) on every k-th request; 0 = never.
        status_every: answer every m-th request (not dropped) with ``status``; 0 = never.
        status: the status of those answers (429 by default, with ``Retry-After: 0``).
        fail_after: once this many requests matched ``fail_match``, answer them all with 503.
        fail_match: regex on the path that ``fail_after`` counts and fails.
    """

    drop_every: int = 0
    status_every: int = 0
    status: int = 429
    fail_after: int | None = None
    fail_match: str = ""
    _matched: int = 0


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict  # lower-case names
    body: bytes
    answered: int | None = None  # status, None when dropped


Route = Callable[["Handler", Request], tuple[int, dict, bytes]]


@dataclass
class Loopback:
    """A threaded HTTP/1.1 server on 127.0.0.1 with routes ``(method, path regex) -> handler``."""

    routes: list[tuple[str, str, Route]] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    log: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        outer = self

        class _H(Handler):
            server_obj = outer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def route(self, method: str, pattern: str, fn: Route) -> None:
        self.routes.append((method, pattern, fn))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests(self, pattern: str = "", method: str | None = None, answered: int | None = 200) -> list[Request]:
        """Logged requests whose path matches ``pattern`` (and method / answer status)."""
        return [
            r
            for r in list(self.log)
            if re.search(pattern, r.path) and (method is None or r.method == method) and (answered is None or r.answered in (answered, 206))
        ]

    def next_number(self) -> int:
        with self._lock:
            self._n += 1
            return self._n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_obj: Loopback

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool = False) -> None:
        srv = self.server_obj
        n = srv.next_number()
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(self.command, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()}, body)
        srv.log.append(req)
        f = srv.faults
        if f.drop_every and n % f.drop_every == 0:
            # TCP reset without any answer, like a dropped connection.
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if f.status_every and n % f.status_every == 0:
            self._send(f.status, {"Retry-After": "0", "Content-Type": "application/json"}, b'{"error": {"code": 429, "message": "rate limited", "status": "RESOURCE_EXHAUSTED"}}', req, head)
            return
        if f.fail_after is not None and re.search(f.fail_match, parts.path):
            f._matched += 1
            if f._matched > f.fail_after:
                self._send(503, {"Content-Type": "application/json"}, b'{"error": {"code": 503, "message": "unavailable", "status": "UNAVAILABLE"}}', req, head)
                return
        method = "GET" if head else self.command
        for m, pattern, fn in srv.routes:
            if m == method and re.fullmatch(pattern, parts.path):
                status, headers, payload = fn(self, req)
                self._send(status, headers, payload, req, head)
                return
        self._send(404, {"Content-Type": "text/plain"}, b"not found", req, head)

    def _send(self, status: int, headers: dict, payload: bytes, req: Request, head: bool) -> None:
        req.answered = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not head:
            self.wfile.write(payload)


def json_response(obj: object, status: int = 200) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def range_response(handler: Handler, data: bytes, content_type: str = "image/tiff") -> tuple[int, dict, bytes]:
    """Serve ``data`` honouring a single ``Range: bytes=a-b`` header."""
    rng = handler.headers.get("Range")
    headers = {"Accept-Ranges": "bytes", "Content-Type": content_type}
    if rng:
        m = re.match(r"bytes=(\d*)-(\d*)", rng)
        if m:
            a, b = m.groups()
            if a == "":
                start, end = max(0, len(data) - int(b)), len(data) - 1
            else:
                start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            if start >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                return 416, headers, b""
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, headers, data[start : end + 1]
    return 200, headers, data
