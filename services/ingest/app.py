"""Wiring of the ingest service: settings → adapters (Cassandra credentials, Redis guard, Kafka sink) →
the pipeline → routers."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from loyalist.http import create_service_app
from loyalist.service import Resources
from loyalist.settings import Settings
from loyalist.topics import EVENTS_RAW
from services.ingest.adapters.guard import IngestGuard
from services.ingest.adapters.kafka_sink import EventSink
from services.ingest.adapters.schema_files import load_schema_documents
from services.ingest.adapters.sources import SourceStore
from services.ingest.api import sdk, webhooks
from services.ingest.api import sources as sources_api
from services.ingest.api.fastpath import TrackingFastPath
from services.ingest.api.tracking import tracking_endpoints, tracking_router
from services.ingest.config import IngestConfig
from services.ingest.domain.schemas import SchemaRegistry
from services.ingest.pipeline import Ingestor

DESCRIPTION = """Every fact Loyalist knows about a customer enters here.

* **Tracking API**, compatible with Segment's HTTP Tracking API:
  `POST /v1/identify|track|page|screen|group|alias|batch`, authenticated with a write key as the HTTP Basic
  username (empty password) or `writeKey` in the body.
  A `200 {"success": true}` means Kafka acknowledged the event.
* The same endpoints under the first-party prefix (default `/lp`) for proxying from the shop's domain.
* **Webhooks** from Shopify, WooCommerce and Zendesk (HMAC-verified, per-shop secrets registered with
  `POST /v1/sources`), and a generic **support** endpoint for any help desk.
"""


def create_app(settings: Settings | None = None, config: IngestConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    config = config or IngestConfig()
    schemas = SchemaRegistry.from_documents(load_schema_documents())
    sink = EventSink(settings, settings.topic(EVENTS_RAW.name), timeout_s=config.produce_timeout_s,
                     linger_ms=config.producer_linger_ms)

    async def on_start(resources: Resources, app: FastAPI) -> None:
        await sink.start()
        app.state.ready_checks["kafka"] = sink.check
        guard = IngestGuard(resources.redis, settings, rate_per_s=config.rate_limit_per_s,
                            burst=config.rate_limit_burst, dedup_ttl_s=config.dedup_ttl_s)
        app.state.ingestor = Ingestor(sink, guard, schemas, config)
        sources = SourceStore(resources.session, ttl_s=config.shop_cache_ttl_s)
        if settings.env == "development":
            await register_dev_sources(sources, config)
        app.state.sources = sources

    async def on_stop(resources: Resources, app: FastAPI) -> None:
        await sink.stop()

    resources = Resources(settings, "ingest", cassandra=True, redis=True, producer=False,
                          on_start=on_start, on_stop=on_stop)
    app = create_service_app("ingest", title="Loyalist ingest", description=DESCRIPTION,
                             lifespan=resources.lifespan)
    app.state.config = config
    app.state.settings = settings
    app.state.schemas = schemas
    app.include_router(tracking_router())
    app.include_router(tracking_router(config.first_party_prefix, include_in_schema=False))
    app.include_router(webhooks.router)
    app.include_router(sources_api.router)
    app.include_router(sdk.router)
    # The tracker's first-party copy, next to the first-party tracking endpoints.
    app.add_api_route(f"{config.first_party_prefix}/l.js", sdk.tracker, methods=["GET"], include_in_schema=False)
    origins = config.cors_origin_list
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["POST", "GET", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Content-Encoding"], max_age=86400,
        )
    return app


def serve_fast(app: FastAPI) -> TrackingFastPath:
    """The ASGI app ``python -m services.ingest`` serves: server-side tracking calls skip FastAPI's stack
    (same endpoints); everything else is the FastAPI app."""
    prefix = app.state.config.first_party_prefix
    return TrackingFastPath(app, routes={**tracking_endpoints(), **tracking_endpoints(prefix)})



async def register_dev_sources(sources: SourceStore, config: IngestConfig) -> None:
    """The documented development shop sources (see docs/ingest.md), so the local stack accepts signed
    webhooks out of the box. Only in env=development."""
    secret = config.dev_webhook_secret
    await sources.put("shopify", config.dev_shopify_domain, "shopify", secret)
    await sources.put("woocommerce", config.dev_woocommerce_url, "woocommerce", secret)
    await sources.put("zendesk", "dev", "zendesk", secret)
