"""The local SMTP sink on private ports: it stores what real SMTP clients send and lists it over HTTP."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from loyalist.devstack import REPO
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_sink_stores_lists_filters_and_clears(tmp_path: Path) -> None:
    smtp_port, http_port = free_port(), free_port()
    env = {**os.environ, "LOYALIST_HOME": str(tmp_path), "LOYALIST_SMTP_PORT": str(smtp_port),
           "LOYALIST_SMTP_SINK_HTTP_PORT": str(http_port)}
    proc = subprocess.Popen([sys.executable, "-m", "loyalist.smtp_sink"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        for to in ("a-1@run.test", "b-2@run.test", "c@other.test"):
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "s@x.test", to, f"hello {to}"
            msg.set_content("plain")
            msg.add_alternative("<p>html</p>", subtype="html")
            asyncio.run(aiosmtplib.send(msg, hostname="127.0.0.1", port=smtp_port))
        with httpx.Client(base_url=base, timeout=10) as client:
            assert len((client.get("/messages")).json()) == 3
            one = (client.get("/messages", params={"to": "A-1@run.test"})).json()
            assert len(one) == 1 and one[0]["subject"] == "hello a-1@run.test"
            assert one[0]["text"].strip() == "plain" and one[0]["html"].strip() == "<p>html</p>"
            run = (client.get("/messages", params={"to_contains": "@run.test"})).json()
            assert sorted(m["to"] for m in run) == ["a-1@run.test", "b-2@run.test"]
            assert (client.delete("/messages")).json() == {"status": "cleared"}
            assert (client.get("/messages")).json() == []
    finally:
        proc.terminate()
        proc.wait(10)
