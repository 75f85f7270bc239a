"""A real SMTP server (aiosmtpd) that accepts every message and keeps it, for the local stack, tests
and the demo. Messages are stored as ``.eml`` files under ``$LOYALIST_HOME/smtp`` and listed as JSON on
``http://127.0.0.1:$LOYALIST_SMTP_SINK_HTTP_PORT/messages`` (``?to=ADDRESS`` filters, ``?to_contains=TEXT``
filters by part of a recipient; ``DELETE`` clears).
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from aiosmtpd.controller import Controller

from loyalist.settings import Settings


class SinkHandler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.eml"
        data = envelope.original_content or envelope.content
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos), "received_at": time.time()}
        with self.lock:
            (self.directory / name).write_bytes(data if isinstance(data, bytes) else data.encode())
            (self.directory / (name + ".json")).write_text(json.dumps(meta))
        return "250 Message accepted for delivery"


_PARSED: dict[str, dict[str, Any]] = {}
_PARSED_LOCK = threading.Lock()


def _parse(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """One stored message as JSON; parsed once and cached (files never change once written), so listing
    thousands of messages does not re-parse every MIME body on every request."""
    with _PARSED_LOCK:
        cached = _PARSED.get(path.name)
    if cached is not None:
        return cached
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    text = html = None
    for part in msg.walk():
        if part.get_content_type() == "text/plain" and text is None:
            text = part.get_content()
        elif part.get_content_type() == "text/html" and html is None:
            html = part.get_content()
    parsed = {
        "id": path.stem, **meta, "subject": msg["Subject"], "from": msg["From"], "to": msg["To"],
        "headers": {k: str(v) for k, v in msg.items()}, "text": text, "html": html,
    }
    with _PARSED_LOCK:
        _PARSED[path.name] = parsed
    return parsed


def list_messages(directory: Path, to: str | None = None, to_contains: str | None = None) -> list[dict[str, Any]]:
    """Stored messages, oldest first; ``to`` keeps an exact recipient, ``to_contains`` a substring of one."""
    out = []
    for path in sorted(directory.glob("*.eml")):
        try:
            meta = json.loads((path.with_name(path.name + ".json")).read_text())
        except (OSError, ValueError):
            continue  # being written right now, or cleared meanwhile
        recipients = [r.lower() for r in meta["rcpt_tos"]]
        if to and to.lower() not in recipients:
            continue
        if to_contains and not any(to_contains.lower() in r for r in recipients):
            continue
        try:
            out.append(_parse(path, meta))
        except OSError:
            continue
    return out


def serve(settings: Settings) -> None:
    directory = settings.state_dir / "smtp"
    directory.mkdir(parents=True, exist_ok=True)
    controller = Controller(SinkHandler(directory), hostname="127.0.0.1", port=settings.smtp_port)
    controller.start()

    class Api(BaseHTTPRequestHandler):
        def _send(self, status: int, body: Any) -> None:
            raw = json.dumps(body, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/healthz":
                self._send(200, {"status": "ok"})
            elif url.path == "/messages":
                query = parse_qs(url.query)
                self._send(200, list_messages(directory, query.get("to", [None])[0],
                                              query.get("to_contains", [None])[0]))
            else:
                self._send(404, {"code": "not_found", "message": url.path})

        def do_DELETE(self) -> None:
            for p in directory.glob("*"):
                p.unlink(missing_ok=True)
            with _PARSED_LOCK:
                _PARSED.clear()
            self._send(200, {"status": "cleared"})

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", settings.smtp_sink_http_port), Api)
    print(f"smtp sink on 127.0.0.1:{settings.smtp_port}, API on :{settings.smtp_sink_http_port}", flush=True)
    try:
        http.serve_forever()
    finally:
        controller.stop()


if __name__ == "__main__":
    serve(Settings())
