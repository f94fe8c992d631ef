"""The socket side: a stdlib ThreadingHTTPServer that hands each request to ``App.handle``."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from engine.emulator._app import App
from engine.emulator._wire import Reply

__all__ = ["EmulatorServer"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect
    disable_nagle_algorithm = True  # else each loopback answer waits ~40 ms for the client's delayed ACK
    server_version = "smartbatch-emulator"
    sys_version = ""
    server: EmulatorServer

    def log_message(self, format: str, *args: Any) -> None:
        # Silenced: stderr noise in tests, and a log line is one more place a credential could leak to.
        return

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.app.handle(method, self.path, headers, body)
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        if reply.parts:
            self._stream(reply)
            return
        self.send_header("content-length", str(len(reply.body)))
        self.end_headers()
        if not reply.trickle_s:
            self.wfile.write(reply.body)
            return
        stopping = self.server.app.core.stopping
        for i in range(len(reply.body)):
            try:
                self.wfile.write(reply.body[i:i + 1])
            except OSError:  # the client gave the read up
                break
            if stopping.wait(reply.trickle_s):
                break
        self.close_connection = True

    def _stream(self, reply: Reply) -> None:
        """A stream's parts, chunked, each at its time (a trickle's a byte at a time); a stream cut short
        (``cut_at``, or the emulator stopping) ends without its last chunk, its connection closed: the client
        reads a body broken midway, as when a provider's connection drops."""
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        body, stopping, start = reply.body, self.server.app.core.stopping, time.monotonic()
        end = len(body) if reply.cut_at is None else reply.cut_at
        parts = ([(i + 1, i * reply.trickle_s) for i in range(end)] if reply.trickle_s
                 else [(min(e, end), at) for k, (e, at) in enumerate(reply.parts)
                       if k + 1 == len(reply.parts) or reply.parts[k + 1][1] != at])  # one write for those due together
        sent = 0
        for upto, at in parts:
            if upto <= sent:
                continue
            if stopping.wait(max(at - (time.monotonic() - start), 0.0)):
                break
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (upto - sent, body[sent:upto]))
                self.wfile.flush()
            except OSError:  # the client gave the read up
                break
            sent = upto
        if sent < len(body):
            self.close_connection = True
            return
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class EmulatorServer(ThreadingHTTPServer):
    """Daemon handler threads; open connections are tracked so ``close`` can cut keep-alive ones, or a pooled
    client connection would still be answered by a stopped emulator."""

    daemon_threads = True
    # The listen backlog: socketserver's default of 5 drops the connection attempts of a burst (a restarted
    # dispatcher polls hundreds of batches at once), and a dropped SYN is retried after 1, 3, 7, ... 63 s.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: App):
        self.app = app
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (it timed out, or was killed) is routine here; say nothing, as with log_message.
        return

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
