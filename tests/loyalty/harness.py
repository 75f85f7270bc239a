"""A minimal service process hosting only loyalty (install() on a bare app), for tests that need
several API replicas: ``python -m tests.loyalty.harness`` (port from LOYALIST_PROFILE_PORT)."""

from __future__ import annotations

from fastapi import FastAPI

from loyalist.http import create_service_app
from loyalist.service import Resources, make_stream_app, run_service
from loyalist.settings import Settings
from services.profile.loyalty import install


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    stream_app = make_stream_app(settings, "loyaltyharness")
    resources = Resources(settings, "profile", cassandra=True, producer=True, stream_app=stream_app)
    app = create_service_app("profile", title="loyalty harness", description="tests only",
                             lifespan=resources.lifespan)
    install(app, stream_app, resources)
    return app


if __name__ == "__main__":
    run_service("profile", create_app)
