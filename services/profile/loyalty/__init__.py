"""Loyalty: points, tiers and rewards as an event-sourced ledger, running inside the profile service.

``install(app, stream_app, resources)`` adds the ``/v1/loyalty`` API, the ``events.resolved`` agent and the
expiry/tier-review schedule to the profile process. Ledger events go to ``events.raw`` as canonical track
events (``Points Earned``, ``Points Redeemed``, ``Points Expired``, ``Points Adjusted``, ``Tier Changed``)
that the profile folds into its ``loyalty`` section. See docs/loyalty.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import faust
    from fastapi import FastAPI

    from loyalist.service import Resources
    from services.profile.loyalty.service import LoyaltyService
    from services.profile.loyalty.settings import LoyaltySettings


class _Lazy:
    """Builds the service on first use: the Cassandra session and the producer only exist once the
    app's lifespan opened them (and the faust app starts after that)."""

    def __init__(self, resources: Resources, config: LoyaltySettings) -> None:
        self.resources = resources
        self.config = config
        self.service: LoyaltyService | None = None

    def __call__(self) -> LoyaltyService:
        if self.service is None:
            from services.profile.loyalty.service import LoyaltyService
            from services.profile.loyalty.settings import Clock
            from services.profile.loyalty.store import LedgerStore, ProgramStore

            if self.resources._session is None:
                raise RuntimeError("loyalty is not ready: Cassandra is not connected yet")
            session = self.resources.session
            producer = self.resources._producer
            self.service = LoyaltyService(
                self.resources.settings, self.config, LedgerStore(session, due_shards=self.config.due_shards),
                ProgramStore(session), producer, Clock(self.config),
            )
        return self.service


def install(app: FastAPI, stream_app: faust.App | None, resources: Resources,
            config: LoyaltySettings | None = None) -> None:
    """Add loyalty to the profile service: routes, the stream agent and the schedule timer (the routes alone
    when ``stream_app`` is None: an API-only process).

    ``resources`` must open Cassandra and the Kafka producer (``cassandra=True, producer=True``).
    """
    from services.profile.loyalty.api import build_router
    from services.profile.loyalty.settings import LoyaltySettings
    from services.profile.loyalty.streams import register_streams

    config = config or LoyaltySettings()
    get_service = _Lazy(resources, config)
    app.state.loyalty = get_service
    app.include_router(build_router())
    if stream_app is None:
        return
    consumers = getattr(app.state, "batch_consumers", None)
    if consumers is None:
        consumers = app.state.batch_consumers = []
    register_streams(stream_app, resources.settings, config, get_service, consumers)


__all__ = ["install"]
