"""The loyalty consumers, task and timer, embedded in the profile service (thin: decode, hand to the service,
which decides, commits and publishes)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import faust

from loyalist.consumer import BatchConsumer, Record, record_values
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RESOLVED, PROFILE_CHANGED
from services.profile.loyalty.service import LoyaltyService
from services.profile.loyalty.settings import LoyaltySettings

log = logging.getLogger(__name__)


def register_streams(
    stream_app: faust.App, settings: Settings, config: LoyaltySettings, get_service: Callable[[], LoyaltyService],
    consumers: list[BatchConsumer],
) -> None:
    """The ledger and erasure consumers (appended to ``consumers``) and the bootstrap task and schedule timer
    (on the faust app: the schedule runs on its leader only)."""
    # The two consumers are plain batch consumers (see loyalist.consumer), started by the profile service with
    # its own: a batch's offsets are committed after the whole batch returned, and the service retries transient
    # failures itself, so nothing is acknowledged before its effect is stored.
    async def ledger(records: Sequence[Record]) -> None:
        await get_service().process_resolved(record_values(records))

    async def erasure(records: Sequence[Record]) -> None:
        await get_service().process_profile_changes(record_values(records))

    group = f"{settings.namespace}-profile-loyalty"
    consumers.extend([
        BatchConsumer(settings, settings.topic(EVENTS_RESOLVED.name), group_id=group, handler=ledger,
                      service="profile", stage="loyalty_ledger", max_records=config.batch_size),
        BatchConsumer(settings, settings.topic(PROFILE_CHANGED.name), group_id=f"{group}-erasure", handler=erasure,
                      service="profile", stage="loyalty_erasure", max_records=config.batch_size),
    ])

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
