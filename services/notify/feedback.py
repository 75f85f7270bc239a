"""Feedback to the stream: delivery outcomes and engagement as canonical track events on ``events.raw``
(source ``notify``, ``context.loyalist.profileId``), and permanent failures on ``message.dlq``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from loyalist.events import Event, encode_event
from loyalist.metrics import KAFKA_PRODUCED
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW, MESSAGE_DLQ
from services.notify.domain.messages import feedback_event_id
from services.notify.metrics import DLQ_SIZE, FEEDBACK

SENT_EVENT = {"email": "Email Sent", "sms": "SMS Sent", "webhook": "Webhook Delivered"}


class Feedback:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.producer = producer
        self.clock = clock
        self.events_topic = settings.topic(EVENTS_RAW.name)
        self.dlq_topic = settings.topic(MESSAGE_DLQ.name)

    async def emit(self, name: str, *, profile_id: str | None, user_id: str | None, properties: Mapping[str, Any],
                   dedup_key: str | None = None, timestamp: datetime | None = None) -> Event:
        """Produce one track event and wait for Kafka's acknowledgement. With ``dedup_key`` the event id is
        deterministic, so emitting again after a crash is deduplicated downstream."""
        now = self.clock()
        event = Event(
            type="track", event=name,
            message_id=feedback_event_id(dedup_key, name) if dedup_key else str(uuid.uuid4()),
            timestamp=timestamp or now, received_at=now, user_id=user_id,
            properties={k: v for k, v in properties.items() if v is not None},
            context={"loyalist": {"profileId": profile_id}} if profile_id else {},
            source="notify",
        )
        key = user_id or profile_id or event.partition_key
        await self.producer.send_and_wait(self.events_topic, encode_event(event), key=key.encode())
        KAFKA_PRODUCED.labels("notify", EVENTS_RAW.name).inc()
        FEEDBACK.labels(name).inc()
        return event

    async def dead_letter(self, request: Mapping[str, Any], *, key: str, reason: str, detail: str,
                          attempts: int) -> None:
        doc = {**request, "error": {"reason": reason, "detail": detail, "attempts": attempts}}
        await self.producer.send_and_wait(self.dlq_topic, orjson.dumps(doc, default=str), key=key.encode())
        KAFKA_PRODUCED.labels("notify", MESSAGE_DLQ.name).inc()
        DLQ_SIZE.inc()
