"""Email over SMTP with aiosmtplib: multipart/alternative (text + HTML), a deterministic Message-ID, and the
RFC 2369 / RFC 8058 unsubscribe headers that mailbox providers require for bulk mail."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
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


class SmtpSender:
    def __init__(self, *, host: str, port: int, domain: str, username: str | None = None,
                 password: str | None = None, use_tls: bool = False, start_tls: bool = False,
                 timeout_s: float = 20.0) -> None:
        self.host = host
        self.port = port
        self.domain = domain
        self.username = username
        self.password = password
        self.use_tls = use_tls
        self.start_tls = start_tls
        self.timeout_s = timeout_s

    async def send(self, mail: OutgoingEmail) -> Delivered:
        msg = build_mime(mail, self.domain)
        try:
            errors, response = await aiosmtplib.send(
                msg, hostname=self.host, port=self.port, username=self.username, password=self.password,
                use_tls=self.use_tls, start_tls=self.start_tls if self.start_tls else None, timeout=self.timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refusals = exc.recipients
            code = refusals[0].code if refusals else 550
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in refusals)
            if 400 <= code < 500:
                raise DeliveryError("smtp_recipient_deferred", detail, permanent=False) from exc
            raise DeliveryError("hard_bounce", detail, permanent=True, bounce=True) from exc
        except aiosmtplib.SMTPResponseException as exc:
            permanent = exc.code >= 500
            raise DeliveryError(f"smtp_{exc.code}", exc.message, permanent=permanent) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError("smtp_unavailable", f"{type(exc).__name__}: {exc}", permanent=False) from exc
        if errors:
            detail = "; ".join(f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in errors.items())
            raise DeliveryError("hard_bounce", detail, permanent=True, bounce=True)
        return Delivered(provider_id=str(msg["Message-ID"]), response=response)
