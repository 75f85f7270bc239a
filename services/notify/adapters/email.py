"""Email over SMTP with aiosmtplib: multipart/alternative (text + HTML), a deterministic Message-ID, and the
RFC 2369 / RFC 8058 unsubscribe headers that mailbox providers require for bulk mail."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import email.utils
import functools
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.message import EmailMessage

import aiosmtplib

from services.notify.adapters import Delivered, DeliveryError


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    message_id: str
    sender: str
    to: str
    subject: str
    text: str
    html: str
    unsubscribe_https: str | None = None
    unsubscribe_mailto: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def build_mime(mail: OutgoingEmail, domain: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = mail.sender
    msg["To"] = mail.to
    msg["Subject"] = mail.subject
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    # The same request always carries the same Message-ID: receivers that thread or deduplicate on it see one.
    msg["Message-ID"] = f"<{mail.message_id}@{domain}>"
    unsubscribe = [f"<{u}>" for u in (mail.unsubscribe_mailto, mail.unsubscribe_https) if u]
    if unsubscribe:
        msg["List-Unsubscribe"] = ", ".join(unsubscribe)
        if mail.unsubscribe_https:
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    for name, value in mail.headers:
        msg[name] = value
    msg.set_content(mail.text or " ")
    if mail.html:
        msg.add_alternative(mail.html, subtype="html")
    return msg


# Printable ASCII only: no CR/LF (header injection), nothing that needs an encoded word.
_PLAIN = re.compile(r"[\x20-\x7e]*\Z")


@functools.lru_cache(maxsize=64)
def _envelope_sender(sender: str) -> str:
    return email.utils.parseaddr(sender)[1] or sender


def _qp(body: str) -> bytes:
    """UTF-8, quoted-printable, CRLF lines. ``=`` is always escaped, so a boundary starting ``=_`` never occurs."""
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"  # as EmailMessage.set_content does
    return binascii.b2a_qp(text.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")


def _subject(subject: str) -> str:
    # Printable ASCII goes as it is (a line may be 998 characters; folding is a "should"); anything else, or text
    # that would read as an encoded word, as RFC 2047 encoded words on folded lines.
    if _PLAIN.match(subject) and len(subject) <= 900 and "=?" not in subject:
        return subject
    return Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")


def mime_bytes(mail: OutgoingEmail, domain: str) -> bytes | None:
    """The message of :func:`build_mime` as wire bytes, written directly: the ``email`` package's header registry
    and generator took a third of notify's CPU per message. Same headers and parts (text + HTML, quoted-printable
    UTF-8). None when an address or extra header holds anything unusual (non-ASCII, line breaks): such a message
    goes through :func:`build_mime` and aiosmtplib's ``send_message``, which encode (SMTPUTF8) or reject it."""
    plain = (mail.sender, mail.to, *(v for h in mail.headers for v in h),
             *(u for u in (mail.unsubscribe_mailto, mail.unsubscribe_https) if u))
    if not all(_PLAIN.match(v) for v in plain):
        return None
    lines = [
        f"From: {mail.sender}", f"To: {mail.to}", f"Subject: {_subject(mail.subject)}",
        f"Date: {email.utils.format_datetime(datetime.now(UTC))}",
        f"Message-ID: <{mail.message_id}@{domain}>",
    ]
    unsubscribe = [f"<{u}>" for u in (mail.unsubscribe_mailto, mail.unsubscribe_https) if u]
    if unsubscribe:
        lines.append("List-Unsubscribe: " + ",\r\n ".join(unsubscribe))
        if mail.unsubscribe_https:
            lines.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    lines.extend(f"{name}: {value}" for name, value in mail.headers)
    lines.append("MIME-Version: 1.0")
    text_part = b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
    text_part += _qp(mail.text or " ")
    if not mail.html:
        return ("\r\n".join(lines) + "\r\n").encode("ascii") + text_part
    boundary = f"=_{mail.message_id}".encode("ascii")
    lines.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary.decode()}"')
    html_part = b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
    html_part += _qp(mail.html)
    return b"".join((
        ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"),
        b"--", boundary, b"\r\n", text_part, b"\r\n",
        b"--", boundary, b"\r\n", html_part, b"\r\n",
        b"--", boundary, b"--\r\n",
    ))


class SmtpSender:
    """Sends over a small pool of persistent SMTP connections: a connection (TCP, greeting, EHLO, TLS, login)
    costs several round trips, and opening one per message limited a notify process to tens of emails a second.

    A connection that sat idle longer than ``idle_s`` is closed rather than reused (servers drop idle clients),
    and one that turns out to be closed when a message starts is replaced once; any other failure closes it and
    is reported as before (transient or permanent), so the delivery log's retry logic is unchanged.
    """

    def __init__(self, *, host: str, port: int, domain: str, username: str | None = None,
                 password: str | None = None, use_tls: bool = False, start_tls: bool = False,
                 timeout_s: float = 20.0, pool_size: int = 8, idle_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.domain = domain
        self.username = username
        self.password = password
        self.use_tls = use_tls
        self.start_tls = start_tls
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        self.idle_s = idle_s
        self._idle: list[tuple[float, aiosmtplib.SMTP]] = []
        self._slots: asyncio.Semaphore | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        # local_hostname: aiosmtplib would otherwise resolve this machine's FQDN for every EHLO.
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, use_tls=self.use_tls,
                                 start_tls=self.start_tls if self.start_tls else None, timeout=self.timeout_s,
                                 local_hostname=self.domain)
        await client.connect()
        if self.username:
            await client.login(self.username, self.password or "")
        return client

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while self._idle:
            since, client = self._idle.pop()
            if now - since < self.idle_s and client.is_connected:
                return client
            client.close()
        return None

    async def close(self) -> None:
        while self._idle:
            _, client = self._idle.pop()
            with contextlib.suppress(Exception):
                await client.quit()

    async def send(self, mail: OutgoingEmail) -> Delivered:
        raw = mime_bytes(mail, self.domain)
        msg = build_mime(mail, self.domain) if raw is None else None
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.pool_size)
        async with self._slots:
            client = self._take_idle()
            reused = client is not None
            try:
                if client is None:
                    client = await self._connect()
                try:
                    errors, response = await self._transmit(client, mail, raw, msg)
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # The server had closed the idle connection before this message began: a fresh one.
                    client.close()
                    client = await self._connect()
                    errors, response = await self._transmit(client, mail, raw, msg)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                self._discard(client)
                refusals = exc.recipients
                code = refusals[0].code if refusals else 550
                detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in refusals)
                if 400 <= code < 500:
                    raise DeliveryError("smtp_recipient_deferred", detail, permanent=False) from exc
                raise DeliveryError("hard_bounce", detail, permanent=True, bounce=True) from exc
            except aiosmtplib.SMTPResponseException as exc:
                self._discard(client)
                permanent = exc.code >= 500
                raise DeliveryError(f"smtp_{exc.code}", exc.message, permanent=permanent) from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                self._discard(client)
                raise DeliveryError("smtp_unavailable", f"{type(exc).__name__}: {exc}", permanent=False) from exc
            self._release(client)
        if errors:
            detail = "; ".join(f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in errors.items())
            raise DeliveryError("hard_bounce", detail, permanent=True, bounce=True)
        return Delivered(provider_id=f"<{mail.message_id}@{self.domain}>", response=response)

    @staticmethod
    async def _transmit(client: aiosmtplib.SMTP, mail: OutgoingEmail, raw: bytes | None,
                        msg: EmailMessage | None) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        if raw is not None:
            return await client.sendmail(_envelope_sender(mail.sender), [mail.to], raw)
        assert msg is not None
        return await client.send_message(msg)

    def _release(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None and client.is_connected:
            self._idle.append((time.monotonic(), client))

    @staticmethod
    def _discard(client: aiosmtplib.SMTP | None) -> None:
        if client is not None:
            client.close()
