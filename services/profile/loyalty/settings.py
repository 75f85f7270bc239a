"""Loyalty settings, read from ``LOYALIST_LOYALTY_*`` environment variables (beside the core Settings)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LoyaltySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALIST_LOYALTY_", extra="ignore")

    # How often the schedule (expiry, tier reviews, unpublished lines) runs, on the faust leader only.
    schedule_interval_s: float = Field(default=300.0, gt=0)
    # The clock: a fixed instant (tests, demos replaying history) or an offset from the real time.
    now: datetime | None = None
    clock_offset_s: float = 0.0
    due_shards: int = Field(default=16, ge=1, le=1024)
    # Attempts of one command under contention (each re-reads the ledger and decides again).
    max_attempts: int = Field(default=200, ge=1)
    # How long producing a command's ledger lines may take before they are left to the outbox retry.
    publish_timeout_s: float = Field(default=10.0, gt=0)
    batch_size: int = Field(default=1000, ge=1)
    concurrency: int = Field(default=64, ge=1)
    # Store this program as version 1 at startup when none exists: "example" (the shipped example program,
    # services/profile/loyalty/example_program.py) or the path of a JSON program definition.
    bootstrap_program: str | None = None
    code_prefix: str = Field(default="LOY", pattern=r"^[A-Z0-9]{1,8}$")


class Clock:
    """``now()`` for every decision: the real UTC time, or the configured instant/offset."""

    def __init__(self, settings: LoyaltySettings) -> None:
        self.fixed = settings.now.astimezone(UTC) if settings.now is not None else None
        self.offset = timedelta(seconds=settings.clock_offset_s)

    def __call__(self) -> datetime:
        return self.fixed if self.fixed is not None else datetime.now(UTC) + self.offset
