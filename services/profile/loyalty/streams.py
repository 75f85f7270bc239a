"""The loyalty faust agent and timer, embedded in the profile service's stream app (thin: decode, hand
to the service, which decides, commits and publishes)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import faust

from loyalist.settings import Settings
from loyalist.topics import EVENTS_RESOLVED, PROFILE_CHANGED
from services.profile.loyalty.service import LoyaltyService
from services.profile.loyalty.settings import LoyaltySettings

log = logging.getLogger(__name__)


def register_streams(
    stream_app: faust.App, settings: Settings, config: LoyaltySettings, get_service: Callable[[], LoyaltyService]
) -> None:
    topic = stream_app.topic(
        settings.topic(EVENTS_RESOLVED.name), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )

    @stream_app.agent(topic, name="loyalty_ledger")
    async def loyalty_ledger(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # Offsets are acknowledged after the whole batch returned; the service retries transient
        # failures itself, so nothing is acknowledged before its effect is stored.
        async for values in stream.take(config.batch_size, within=0.5):
            await get_service().process_resolved(list(values))
            yield None

    changes = stream_app.topic(
        settings.topic(PROFILE_CHANGED.name), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )

    @stream_app.agent(changes, name="loyalty_erasure")
    async def loyalty_erasure(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for values in stream.take(config.batch_size, within=0.5):
            await get_service().process_profile_changes(list(values))
            yield None

    @stream_app.task
    async def loyalty_bootstrap() -> None:
        if config.bootstrap_program:
            try:
                program = await get_service().bootstrap_program(config.bootstrap_program)
                if program is not None:
                    log.info("loyalty program version 1 stored from %s", config.bootstrap_program)
            except Exception:
                log.exception("storing the bootstrap loyalty program failed")

    @stream_app.timer(interval=config.schedule_interval_s, on_leader=True, name="loyalty_schedule")
    async def loyalty_schedule() -> None:
        try:
            handled = await get_service().run_due()
            if handled:
                log.info("loyalty schedule handled %d accounts", handled)
        except Exception:
            log.exception("loyalty schedule run failed; the next run retries")
