"""A fault-injecting HTTP proxy in front of the S3 emulator: it answers some
requests with 500 / 503 SlowDown without forwarding them, delays others,
and drops connections (sometimes before forwarding, sometimes after the
emulator has acted, so a client's retry meets its own earlier write)."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message></Error>')
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b'<Message>We encountered an internal error.</Message></Error>')


class FaultyS3:
    def __init__(self, upstream: str, *, max_delay=0.3, seed=None, faults=True,
                 host: str = "127.0.0.1"):
        self.upstream = urllib.parse.urlparse(upstream)
        # `down`: every request is refused (connection dropped), as if the
        # store were unreachable; `enabled`: the scheduled faults below;
        # `latency`: seconds every request waits before it is forwarded (a
        # latency spike; 0 = off), independent of `enabled`.
        self.down = False
        self.latency = 0.0
        self.max_delay = max_delay
        self.n = 0
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "errors": 0, "delays": 0, "drops": 0}
        self.enabled = faults
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._choose()
                if fault == "error":
                    status, payload = proxy._error()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "drop-before":
                    self._drop()
                    return
                if fault == "delay":
                    time.sleep(proxy.rng.uniform(0, proxy.max_delay))
                spike = proxy.latency
                if spike > 0:
                    time.sleep(spike)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                with proxy.lock:
                    proxy.counts["forwarded"] += 1
                if fault == "drop-after":
                    self._drop()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                         "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _drop(self):
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _choose(self) -> str:
        # A fixed schedule by request number, so every kind of fault happens
        # within the first few requests of every run: ~14 % errors, ~9 %
        # dropped connections (alternately before and after the emulator
        # acted), ~20 % delayed.
        with self.lock:
            if self.down:
                return "drop-before"
            if not self.enabled:
                return "none"
            self.n += 1
            n = self.n
            if n % 7 == 3:
                self.counts["errors"] += 1
                return "error"
            if n % 11 == 5:
                self.counts["drops"] += 1
                return "drop-before" if (n // 11) % 2 == 0 else "drop-after"
            if n % 5 == 1:
                self.counts["delays"] += 1
                return "delay"
            return "none"

    def _error(self):
        with self.lock:
            return (503, SLOWDOWN) if self.rng.random() < 0.5 else (500, INTERNAL)

    def __enter__(self) -> "FaultyS3":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
