"""A loopback HTTP proxy that injects S3 faults in front of a real (moto) S3 server.

Each request is forwarded to ``upstream`` unless the proxy draws a fault for it (probability
``rate``, from a seeded ``random.Random``: the fault sequence is deterministic for a given seed
and request order). Modes:

- ``slowdown``: 503 with an S3 ``SlowDown`` error body (throttling); nothing forwarded.
- ``internal``: 500 with an S3 ``InternalError`` body; nothing forwarded.
- ``reset``: the connection is reset (RST) before any response; on every other drawn reset the
  request is forwarded first, so the server did the work and the client never hears of it.
- ``cut``: the request is forwarded, status and headers are sent with the full
  ``Content-Length``, then the connection is reset part-way through the body (bodies of less
  than 2 bytes: reset before the body).
- ``latency``: the request succeeds after ``latency_s`` seconds.
- ``mix``: each fault picks one of the modes above.

``mode``, ``rate`` and ``latency_s`` may be changed while the proxy runs (e.g. ``rate = 0`` when
"the outage ends"); ``counts`` tallies the faults injected per mode and ``log`` lists every
request as ``(method, path, fault)``. Run standalone with
``python tests/fault_proxy.py --upstream http://127.0.0.1:5000 --mode mix --rate 0.2``.
"""

from __future__ import annotations

import argparse
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

MODES = ("slowdown", "internal", "reset", "cut", "latency")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class FaultProxy:
    """The proxy server (a daemon thread); ``url`` is what clients use as the S3 endpoint."""

    def __init__(
        self,
        upstream: str,
        mode: str = "mix",
        rate: float = 0.0,
        seed: int = 0,
        latency_s: float = 0.2,
        port: int = 0,
    ) -> None:
        if mode not in (*MODES, "mix"):
            msg = f"unknown fault mode {mode!r}: use one of {', '.join((*MODES, 'mix'))}"
            raise ValueError(msg)
        up = urlparse(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.mode = mode
        self.rate = rate
        self.latency_s = latency_s
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault or None)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = _QuietServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set(self, mode: str | None = None, rate: float | None = None) -> None:
        with self._lock:
            if mode is not None:
                self.mode = mode
            if rate is not None:
                self.rate = rate

    def draw(self, method: str = "", path: str = "") -> tuple[str | None, float]:
        """The fault for the next request (None: none) and a uniform number for its details."""
        with self._lock:
            self.requests += 1
            hit = self._rng.random() < self.rate
            mode = self.mode if self.mode != "mix" else self._rng.choice(MODES)
            u = self._rng.random()
            if hit:
                self.counts[mode] += 1
            self.log.append((method, path, mode if hit else None))
            return (mode if hit else None), u


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # clients drop connections we reset; nothing to report


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _reset(self) -> None:
        """Abort the client connection with an RST (SO_LINGER 0)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes):
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        if self.command == "HEAD":
            self.send_header("Content-Length", length or "0")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _handle(self) -> None:
        body = self._read_body()
        fault, u = self.owner.draw(self.command, self.path)
        if fault in _ERRORS:
            status, code, text = _ERRORS[fault]
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{text}</Message><RequestId>fault-proxy</RequestId></Error>"
            ).encode()
            self._send(status, code, [("Content-Type", "application/xml")], xml)
            return
        if fault == "reset":
            if u < 0.5:
                self._forward(body)
            self._reset()
            return
        if fault == "latency":
            time.sleep(self.owner.latency_s)
        status, reason, headers, data = self._forward(body)
        if fault == "cut" and self.command != "HEAD":
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if len(data) >= 2:
                self.wfile.write(data[: max(1, int(len(data) * u * 0.9))])
            self.wfile.flush()
            time.sleep(0.05)  # let the client take the partial body before the RST drops it
            self._reset()
            return
        self._send(status, reason, headers, data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--mode", default="mix", choices=(*MODES, "mix"))
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    proxy = FaultProxy(args.upstream, args.mode, args.rate, args.seed, port=args.port).start()
    print(proxy.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
