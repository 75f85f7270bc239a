"""Notify's own settings (env ``LOYALIST_NOTIFY_*``), next to the shared ``Settings``.

Providers are configured per environment: SMTP host/port come from the shared settings
(``LOYALIST_SMTP_HOST``/``LOYALIST_SMTP_PORT``), credentials and TLS from here.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import time, timedelta
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.notify.domain.policy import FrequencyCap, PolicyConfig, QuietHours
from services.notify.domain.retry import RetryPlan


class NotifyConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALIST_NOTIFY_", extra="ignore")

    # Base URL of the public endpoints (unsubscribe, click, open); default: the service URL.
    public_url: str | None = None
    from_email: str = "Loyalist <no-reply@loyalist.local>"
    mail_domain: str = "loyalist.local"
    smtp_username: str | None = None
    smtp_password: str | None = Field(default=None, repr=False)
    smtp_use_tls: bool = False
    smtp_start_tls: bool = False
    smtp_timeout_s: float = 15.0

    # SMS provider (the Twilio Messages API shape, see docs/notify.md).
    sms_base_url: str = "https://api.twilio.com"
    sms_account_sid: str = "AC_dev"
    sms_auth_token: str = Field(default="dev-token", repr=False)
    sms_from: str = "+15555550000"
    webhook_timeout_s: float = 10.0

    # Consumer identity: a stable instance id gives static group membership, so a restarted process takes its
    # partitions back at once instead of waiting for the session timeout.
    instance_id: str | None = None
    session_timeout_ms: int = 10_000
    concurrency: int = 32
    batch_size: int = 200

    # A claim older than this belongs to a dead process and may be taken over. It must outlast one message's
    # provider calls including the immediate retries ((1 + RETRY_IMMEDIATE) x SMTP timeout + backoff), or a
    # slow but live send could be taken over and sent twice; a shorter lease only speeds up crash recovery.
    lease_s: float = 60.0
    schedule_poll_s: float = 1.0
    retry_immediate: int = 2
    retry_max_attempts: int = 8
    retry_base_s: float = 2.0
    retry_cap_s: float = 3600.0
    # A message found in "sending" after a crash may or may not have reached the provider: resend (at least
    # once, the duplicate carries the same Message-ID) or give up (at most once).
    ambiguous_policy: Literal["resend", "give_up"] = "resend"

    email_requires_opt_in: bool = True
    sms_requires_opt_in: bool = True
    # JSON: {"caps": [{"channel","max_count","window_s","action"}], "quiet_hours": [{"channel","start","end"}],
    #        "default_timezone": "UTC", "max_defer_s": 259200}
    policy_json: str | None = None

    # Test-only fault injection: die with SIGKILL at a named point (see services/notify/faults.py).
    crash_point: str | None = None
    crash_probability: float = 1.0
    crash_every: int | None = None

    def owner_prefix(self, port: int) -> str:
        return self.instance_id or f"notify-{socket.gethostname()}-{port}"

    def retry_plan(self) -> RetryPlan:
        return RetryPlan(immediate=self.retry_immediate, max_attempts=self.retry_max_attempts,
                         base_s=self.retry_base_s, cap_s=self.retry_cap_s)

    def policy(self) -> PolicyConfig:
        base = PolicyConfig()
        opt_in = {**base.requires_opt_in, "email": self.email_requires_opt_in, "sms": self.sms_requires_opt_in}
        if not self.policy_json:
            return PolicyConfig(caps=base.caps, quiet_hours=base.quiet_hours, requires_opt_in=opt_in)
        doc: dict[str, Any] = json.loads(self.policy_json)
        caps = base.caps
        if "caps" in doc:
            caps = tuple(FrequencyCap(c["channel"], int(c["max_count"]), timedelta(seconds=float(c["window_s"])),
                                      c.get("action", "defer")) for c in doc["caps"])
        quiet = base.quiet_hours
        if "quiet_hours" in doc:
            quiet = tuple(QuietHours(q["channel"], time.fromisoformat(q["start"]), time.fromisoformat(q["end"]))
                          for q in doc["quiet_hours"])
        return PolicyConfig(
            caps=caps, quiet_hours=quiet, requires_opt_in=opt_in,
            default_timezone=doc.get("default_timezone", base.default_timezone),
            max_defer=timedelta(seconds=float(doc.get("max_defer_s", base.max_defer.total_seconds()))),
        )


def process_incarnation() -> str:
    return f"{os.getpid()}-{os.urandom(4).hex()}"
