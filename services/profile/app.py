"""Wiring of the profile service: settings → faust app and adapters → the two pipeline stages → routers.

The faust app and ``Resources`` are built first so extensions (``services.profile.loyalty.install``) can
add their agents and routes before the routers of this module are included.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from loyalist.http import create_service_app
from loyalist.kafka import ensure_topics, produce_many
from loyalist.service import Resources, watch_consumers
from loyalist.settings import Settings
from loyalist.topics import PROFILE_FOLD
from services.profile.api import profiles_router
from services.profile.loyalty import install as install_loyalty
from services.profile.processor import Emitter, Folder, Resolver, Tombstones
from services.profile.store import HotProfiles, ProfileStore
from services.profile.streams import Runtime, build_consumers, build_stream_app

DESCRIPTION = """Live customer profiles: identity resolution, the 360-degree profile, the event store.

* `GET /v1/profiles/{identifier}` (`?by=user_id|anonymous_id|email|phone|profile_id`, `?as_of=`,
  `?observation_date=`), `/events` (timeline), `/identities`, `/segments`, `/export`, `DELETE` (erasure).
* Bearer API tokens with the `profiles:read` / `profiles:write` scopes.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime()
    # LOYALIST_PROFILE_API_ONLY: the API without the pipeline (no consumers, no faust app). Erasure requests are
    # still accepted: they go to the workers through the fold topic, and every worker reads the tombstones.
    api_only = settings.profile_api_only
    stream_app = None if api_only else build_stream_app(settings, runtime)

    async def on_start(resources: Resources, app: FastAPI) -> None:
        # The internal hand-over topic must exist before the fold agent subscribes.
        await ensure_topics(settings, [PROFILE_FOLD])
        store = ProfileStore(resources.session)
        hot = HotProfiles(resources.redis, settings)
        producer = resources.producer
        fold_topic = settings.topic(PROFILE_FOLD.name)

        async def dispatch(messages: list[tuple[str, bytes]]) -> None:
            futures = await produce_many(producer, fold_topic, [(key.encode(), value) for key, value in messages])
            if futures:
                await asyncio.gather(*futures)

        tombstones = Tombstones(store)
        await tombstones.refresh()
        runtime.tombstones = tombstones
        runtime.dispatch = dispatch
        app.state.profile_store = store
        app.state.hot_profiles = hot
        app.state.profile_runtime = runtime
        if api_only:
            runtime.consumers = []
            return
        runtime.resolver = Resolver(store, hot, tombstones, dispatch)
        runtime.folder = Folder(store, hot, Emitter(producer, settings), tombstones, dispatch)
        # The pipeline's consumers, then those extensions (loyalty) registered.
        runtime.consumers = build_consumers(settings, runtime)
        if "loyalty" in settings.profile_stage_set:
            runtime.consumers += list(getattr(app.state, "batch_consumers", []))
        for consumer in runtime.consumers:
            await consumer.start()

        async def consumers_check() -> bool:
            return all(c.running for c in runtime.consumers)

        app.state.ready_checks["consumers"] = consumers_check
        watch_consumers(app, "profile", lambda: runtime.consumers)

    async def on_stop(resources: Resources, app: FastAPI) -> None:
        for consumer in getattr(runtime, "consumers", []):
            await consumer.stop()

    resources = Resources(settings, "profile", cassandra=True, redis=True, producer=True, stream_app=stream_app,
                          on_start=on_start, on_stop=on_stop)
    app = create_service_app("profile", title="Loyalist profiles", description=DESCRIPTION,
                             lifespan=resources.lifespan)
    app.state.settings = settings
    app.state.stream_app = stream_app
    app.state.resources = resources
    install_loyalty(app, stream_app, resources)
    app.include_router(profiles_router())
    return app
