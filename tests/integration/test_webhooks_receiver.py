"""A real HTTP receiver on 127.0.0.1 for the webhook tests: it checks each POST's
signature with its own HMAC code (not msgcore's), can fail an event's first N deliveries, and
records what it received in order."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def verify(secret: str, header: str, body: bytes) -> bool:
    """Independent check of `Msgcore-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if "t" not in fields or "v1" not in fields:
        return False
    mac = hmac.HMAC(secret.encode("utf-8"), digestmod=hashlib.sha256)
    mac.update(fields["t"].encode("ascii") + b"." + body)
    return hmac.compare_digest(mac.hexdigest(), fields["v1"])


@dataclass
class Received:
    event_id: str
    header_event_id: str
    item: dict[str, Any]
    signed: bool
    status: int


@dataclass
class Receiver:
    secret: str = ""
    fail_first: int = 0  # answer 500 to each event's first N deliveries
    always_fail: bool = False
    received: list[Received] = field(default_factory=list)
    tries: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def answer(self, header: str, event_id: str, body: bytes) -> int:
        item = json.loads(body)
        with self.lock:
            n = self.tries[item["id"]] = self.tries.get(item["id"], 0) + 1
            status = 500 if self.always_fail or n <= self.fail_first else 200
            self.received.append(Received(item["id"], event_id, item, verify(self.secret, header, body), status))
        return status

    def delivered(self) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.status == 200]


@contextmanager
def running(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.answer(self.headers.get("Msgcore-Signature", ""),
                                     self.headers.get("Msgcore-Event-Id", ""), body)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def test_the_receivers_own_check_refuses_a_tampered_body_or_secret() -> None:
    body = b'{"id":"M:1"}'
    mac = hmac.new(b"k", b"7." + body, hashlib.sha256).hexdigest()
    assert verify("k", f"t=7,v1={mac}", body)
    assert not verify("k", f"t=7,v1={mac}", body + b" ")
    assert not verify("other", f"t=7,v1={mac}", body)
    assert not verify("k", f"t=8,v1={mac}", body)
