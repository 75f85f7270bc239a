"""Everything notify's routes and loops share, built once in the lifespan: the store, the notifier, the link
signer, and the consent/engagement operations behind the public endpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer

from loyalist.settings import Settings
from services.notify.adapters.profiles import ProfileReader
from services.notify.config import NotifyConfig
from services.notify.delivery import Notifier
from services.notify.domain.messages import address_subject
from services.notify.domain.policy import DEFAULT_GROUP
from services.notify.feedback import Feedback
from services.notify.links import LinkSigner
from services.notify.store import LogRow, NotifyStore


@dataclass
class NotifyContext:
    settings: Settings
    config: NotifyConfig
    store: NotifyStore
    profiles: ProfileReader
    notifier: Notifier
    links: LinkSigner
    feedback: Feedback
    producer: AIOKafkaProducer
    clock: Callable[[], datetime]

    async def change_consent(self, *, profile_id: str, user_id: str | None, channel: str, group: str,
                             subscribed: bool, source: str, message_id: str | None = None,
                             address: str | None = None) -> None:
        """Record the change in notify's table at once (later requests see it immediately), then tell the
        stream so the profile folds it."""
        now = self.clock()
        # Leaving the default group means leaving the channel's marketing altogether.
        scope = "*" if group in ("*", "", DEFAULT_GROUP) else group
        await self.store.set_consent(profile_id, channel, scope, subscribed, now, source)
        name = "Unsubscribed" if not subscribed else "Subscribed"
        props: dict[str, Any] = {"channel": channel, "group": None if scope == "*" else scope, "source": source,
                                 "message_id": message_id}
        if address and channel == "email":
            props["email"] = address
        elif address and channel == "sms":
            props["phone"] = address
        real_profile = None if profile_id.startswith("address:") else profile_id
        await self.feedback.emit(name, profile_id=real_profile, user_id=user_id, properties=props)

    async def unsubscribe_from_token(self, payload: Mapping[str, Any]) -> None:
        channel = str(payload.get("c") or "email")
        group = str(payload.get("g") or DEFAULT_GROUP)
        address = payload.get("a")
        profile_id = payload.get("p") or (address_subject(channel, str(address)) if address else None)
        if not profile_id:
            return
        user_id = None
        message_id = str(payload.get("m") or "") or None
        if message_id:
            row = await self.store.by_message_id(message_id)
            user_id = row.raw.get("user_id") if row else None
        await self.change_consent(profile_id=str(profile_id), user_id=user_id, channel=channel, group=group,
                                  subscribed=False, source="unsubscribe_link", message_id=message_id,
                                  address=str(address) if address else None)

    async def engagement(self, name: str, message_id: str, **properties: Any) -> None:
        row = await self.store.by_message_id(message_id)
        if row is None:
            return
        await self.feedback.emit(name, profile_id=row.raw.get("profile_id"), user_id=row.raw.get("user_id"),
                                 properties={"channel": row.raw.get("channel"), "message_id": message_id,
                                             "template_id": row.raw.get("template_id"),
                                             "journey_id": row.request.get("journeyId"),
                                             "email": row.raw.get("recipient"), **properties})

    async def provider_event(self, row: LogRow, event: str, bounce_type: str, detail: str) -> None:
        r = row.raw
        props = {"channel": r.get("channel"), "message_id": r.get("message_id"), "template_id": r.get("template_id"),
                 "email": r.get("recipient")}
        key = row.idempotency_key
        if event == "delivered":
            await self.feedback.emit("Email Delivered", profile_id=r.get("profile_id"), user_id=r.get("user_id"),
                                     properties=props, dedup_key=key)
        elif event == "bounced":
            if bounce_type == "hard" and r.get("recipient"):
                await self.store.suppress(r.get("channel") or "email", r["recipient"], "hard_bounce", self.clock())
            await self.feedback.emit("Email Bounced", profile_id=r.get("profile_id"), user_id=r.get("user_id"),
                                     properties={**props, "bounce_type": bounce_type, "reason": detail},
                                     dedup_key=key)
        elif event == "complained" and r.get("profile_id"):
            # A spam complaint is the strongest opt-out there is.
            await self.change_consent(profile_id=r["profile_id"], user_id=r.get("user_id"),
                                      channel=r.get("channel") or "email", group="*", subscribed=False,
                                      source="complaint", message_id=r.get("message_id"), address=r.get("recipient"))
