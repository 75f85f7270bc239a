"""Segmenter service wiring: settings → Cassandra, producer, engine, model runtime, faust agents → API."""

from __future__ import annotations

from fastapi import FastAPI

from loyalist.http import create_service_app
from loyalist.service import Resources, watch_consumers
from loyalist.settings import Settings
from services.segmenter.api import models_router, segments_router
from services.segmenter.config import SegmenterConfig
from services.segmenter.engine import SegmenterEngine
from services.segmenter.models import ModelRuntime
from services.segmenter.store import SegmenterStore
from services.segmenter.streams import build_consumer


def create_app(settings: Settings | None = None, config: SegmenterConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    config = config or SegmenterConfig()
    holder: dict[str, SegmenterEngine] = {}

    def get_engine() -> SegmenterEngine:
        return holder["engine"]

    async def revoked(_partitions: object) -> None:
        # What is left of the last batch (outbox rows, churn observations) lands before another worker goes on.
        if "engine" in holder:
            await holder["engine"].finish_pending()

    consumer = build_consumer(settings, get_engine, on_revoked=revoked)

    async def on_start(resources: Resources, app: FastAPI) -> None:
        store = SegmenterStore(resources.session)
        engine = SegmenterEngine(settings, config, store, resources.producer)
        models = ModelRuntime(engine, store, config)
        engine.churn = models
        await engine.start()
        await models.start()
        holder["engine"] = engine
        app.state.engine = engine
        app.state.models = models
        await consumer.start()
        watch_consumers(app, "segmenter", lambda: [consumer])

    async def on_stop(resources: Resources, app: FastAPI) -> None:
        models: ModelRuntime | None = getattr(app.state, "models", None)
        engine: SegmenterEngine | None = getattr(app.state, "engine", None)
        await consumer.stop()
        if engine is not None:
            await engine.finish_pending()
        if models is not None:
            await models.stop()
        if engine is not None:
            await engine.stop()

    resources = Resources(settings, "segmenter", cassandra=True, producer=True,
                          on_start=on_start, on_stop=on_stop)
    app = create_service_app(
        "segmenter", title="Loyalist segmenter",
        description="Live rule segments, RFM, lifecycle stages, churn and lifetime-value predictions, "
                    "recommendations.",
        lifespan=resources.lifespan,
    )
    app.include_router(segments_router)
    app.include_router(models_router)
    return app
