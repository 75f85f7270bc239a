"""Profile API: the live profile (from Redis), its timeline, identities, segments, export, a profile as
of a past time (refolded from the event store) and erasure."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, date, datetime
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import ORJSONResponse, Response

from loyalist.auth import require_scope
from loyalist.events import utcnow
from loyalist.http import ERROR_RESPONSES, ApiError
from loyalist.topics import PROFILE_FOLD
from services.profile.domain.identity import Identifier, normalize_email, normalize_phone, subject_hash
from services.profile.domain.profile import fold_all, iso, render, to_ms, with_observation_day
from services.profile.processor import fold_message
from services.profile.store import HotProfiles, ProfileStore, dt_to_ms
from services.profile.streams import Runtime

LookupKind = Literal["profile_id", "user_id", "anonymous_id", "email", "phone"]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No profile for this identifier"}}
MAX_REDIRECTS = 8
PROFILE_ID = re.compile(r"p\d[0-9a-f]{24}")
END_OF_TIME_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z


def _store(request: Request) -> ProfileStore:
    store = getattr(request.app.state, "profile_store", None)
    if store is None:
        raise ApiError(503, "not_ready", "the profile service is starting")
    return store  # type: ignore[no-any-return]


def _hot(request: Request) -> HotProfiles:
    return request.app.state.hot_profiles  # type: ignore[no-any-return]


def _normalize(kind: str, value: str) -> str:
    if kind == "email":
        email = normalize_email(value)
        if email is None:
            raise ApiError(422, "invalid_identifier", "not an email address", identifier=value)
        return email
    if kind == "phone":
        phone = normalize_phone(value)
        if phone is None:
            raise ApiError(422, "invalid_identifier", "not a phone number", identifier=value)
        return phone
    return value


async def _follow(request: Request, profile_id: str) -> tuple[str, dict[str, Any] | None]:
    """The live profile id (following merges) and its document, from Redis, else Cassandra."""
    hot, store = _hot(request), _store(request)
    for _ in range(MAX_REDIRECTS):
        hot_pid, raw = await hot.resolve(profile_id=profile_id, max_redirects=MAX_REDIRECTS)
        profile_id = hot_pid or profile_id
        if raw is not None:
            return profile_id, orjson.loads(raw)
        snapshot = (await store.documents([profile_id])).get(profile_id)
        if snapshot is None:
            return profile_id, None
        document, merged_into = snapshot
        if merged_into:
            profile_id = merged_into
            continue
        if document is not None:
            # The snapshot is not rewritten when a segment membership changes; its rows are current.
            rows = await store.segment_rows(profile_id)
            document = {**document, "segments": sorted(r["segment_id"] for r in rows if r["member"])}
        return profile_id, document
    raise ApiError(500, "merge_loop", "profile redirects do not end")


async def _lookup_stored(request: Request, kind: str, value: str) -> str | None:
    known = await _store(request).lookup_identities([Identifier(kind, value)])
    return known.get(Identifier(kind, value))


async def resolve(request: Request, identifier: str, by: LookupKind | None) -> tuple[str, dict[str, Any] | None]:
    """Find the profile an identifier names; by default a profile id, then a user id."""
    if by == "profile_id" or (by is None and PROFILE_ID.fullmatch(identifier)):
        pid, doc = await _follow(request, identifier)
        if doc is not None or by == "profile_id":
            return pid, doc
    by = by or "user_id"
    value = _normalize(by, identifier)
    # The common case in one Redis round trip: identifier -> profile id -> document.
    hot_pid, raw = await _hot(request).resolve(ident=(by, value), max_redirects=MAX_REDIRECTS)
    if raw is not None and hot_pid is not None:
        return hot_pid, orjson.loads(raw)
    pid_found = hot_pid or await _lookup_stored(request, by, value)
    if pid_found is None:
        return identifier, None
    return await _follow(request, pid_found)


async def _require(request: Request, identifier: str, by: LookupKind | None) -> tuple[str, dict[str, Any]]:
    pid, doc = await resolve(request, identifier, by)
    if doc is None:
        raise ApiError(404, "profile_not_found", f"no profile for {by or 'profile or user id'} '{identifier}'")
    return pid, doc


async def live_profile(request: Request, identifier: str, by: LookupKind | None) -> dict[str, Any]:
    """The live profile document as the API answers it (``rfm.T_days`` measured to today)."""
    _, doc = await _require(request, identifier, by)
    return with_observation_day(doc, utcnow().date())


def _parse_time(value: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "invalid_time", f"{name} must be an ISO 8601 time", value=value) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _parse_day(value: str) -> date:
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise ApiError(422, "invalid_date", "observation_date must be YYYY-MM-DD", value=value) from None


def profiles_router() -> APIRouter:
    router = APIRouter(prefix="/v1/profiles", tags=["profiles"], responses=ERROR_RESPONSES)
    read = Depends(require_scope("profiles:read"))
    write = Depends(require_scope("profiles:write"))

    @router.get("/{identifier}", summary="A live profile (or as of a past time)", responses=NOT_FOUND,
                dependencies=[read])
    async def get_profile(
        request: Request, identifier: str,
        by: LookupKind | None = Query(None, description="what the identifier is (default: profile id, then user id)"),
        as_of: str | None = Query(None, description="ISO time: the profile rebuilt from events up to then"),
        observation_date: str | None = Query(None, description="YYYY-MM-DD to measure rfm.T_days to"),
    ) -> Response:
        pid, doc = await _require(request, identifier, by)
        if as_of is not None:
            at = _parse_time(as_of, "as_of")
            events = await _store(request).events(pid, until_ms=to_ms(at))
            if not events:
                raise ApiError(404, "profile_not_found", f"profile '{pid}' had no events by {as_of}")
            doc = render(fold_all(pid, [r.event for r in events]), now=at)
            doc["as_of"] = iso(to_ms(at))
        day = _parse_day(observation_date) if observation_date else (
            _parse_time(as_of, "as_of").date() if as_of else utcnow().date())
        return ORJSONResponse(with_observation_day(doc, day))

    @router.get("/{identifier}/events", summary="The profile's timeline, newest first, paged",
                responses=NOT_FOUND, dependencies=[read])
    async def get_events(
        request: Request, identifier: str, by: LookupKind | None = None,
        limit: int = Query(50, ge=1, le=500),
        since: str | None = Query(None, description="ISO time: oldest event to include"),
        until: str | None = Query(None, description="ISO time: newest event to include"),
        cursor: str | None = Query(None, description="the 'next' value of the previous page"),
    ) -> dict[str, Any]:
        pid, _ = await _require(request, identifier, by)
        if cursor:
            try:
                ms_text, _, key = cursor.partition("|")
                end = (int(ms_text), key)
            except ValueError:
                raise ApiError(422, "invalid_cursor", "cursor is not one this API returned") from None
        else:
            end = (to_ms(_parse_time(until, "until")) + 1 if until else END_OF_TIME_MS, "")
        since_ms = to_ms(_parse_time(since, "since")) if since else None
        rows = await _store(request).events_before(pid, end, limit + 1)
        if since_ms is not None:
            rows = [r for r in rows if r.ts_ms >= since_ms]
        page = rows[:limit]
        more = len(rows) > limit
        return {
            "profile_id": pid,
            "events": [r.event.model_dump(mode="json", by_alias=True, exclude_none=True) for r in page],
            "next": f"{page[-1].ts_ms}|{page[-1].event_key}" if more and page else None,
        }

    @router.get("/{identifier}/identities", summary="Identifiers linked to the profile and its merges",
                responses=NOT_FOUND, dependencies=[read])
    async def get_identities(request: Request, identifier: str, by: LookupKind | None = None) -> dict[str, Any]:
        pid, _ = await _require(request, identifier, by)
        store = _store(request)
        rows, merges = await asyncio.gather(store.profile_identities(pid), store.merges(pid))
        return {
            "profile_id": pid,
            "identities": [{"kind": r["kind"], "value": r["value"], "linked_at": _iso_dt(r["linked_at"])}
                           for r in rows],
            "merges": [{"merged": m["merged"], "reason": m["reason"], "cause": m["cause"],
                        "events_moved": m["events_moved"], "identifiers_moved": m["identifiers_moved"],
                        "merged_at": _iso_dt(m["merged_at"])} for m in merges],
        }

    @router.get("/{identifier}/segments", summary="Segments the profile is in", responses=NOT_FOUND,
                dependencies=[read])
    async def get_segments(request: Request, identifier: str, by: LookupKind | None = None) -> dict[str, Any]:
        pid, _ = await _require(request, identifier, by)
        rows = await _store(request).segment_rows(pid)
        return {"profile_id": pid, "segments": [
            {"segment_id": r["segment_id"], "segment_name": r["segment_name"], "since": _iso_dt(r["changed_at"])}
            for r in rows if r["member"]]}

    @router.get("/{identifier}/export", summary="Everything held about the person (JSON)", responses=NOT_FOUND,
                dependencies=[read])
    async def export(request: Request, identifier: str, by: LookupKind | None = None) -> dict[str, Any]:
        pid, doc = await _require(request, identifier, by)
        store = _store(request)
        events, identities, merges, segments = await asyncio.gather(
            store.events(pid), store.profile_identities(pid), store.merges(pid), store.segment_rows(pid))
        return {
            "profile_id": pid,
            "exported_at": iso(to_ms(utcnow())),
            "profile": doc,
            "identities": [{"kind": r["kind"], "value": r["value"], "linked_at": _iso_dt(r["linked_at"])}
                           for r in identities],
            "merges": [{k: (_iso_dt(v) if isinstance(v, datetime) else v) for k, v in m.items()} for m in merges],
            "segments": [{"segment_id": r["segment_id"], "segment_name": r["segment_name"], "member": r["member"],
                          "changed_at": _iso_dt(r["changed_at"])} for r in segments],
            "events": [r.event.model_dump(mode="json", by_alias=True, exclude_none=True) for r in events],
        }

    @router.delete("/{identifier}", summary="Erase the person everywhere (events, identities, snapshots, cache)",
                   responses={**NOT_FOUND, 202: {"description": "Erasure accepted, still running"}},
                   dependencies=[write])
    async def erase(request: Request, identifier: str, by: LookupKind | None = None,
                    wait_s: float = Query(20.0, ge=0, le=60)) -> ORJSONResponse:
        pid, _ = await _require(request, identifier, by)
        store = _store(request)
        runtime: Runtime = request.app.state.profile_runtime
        now = utcnow()
        # Tombstones first: from here on, nothing received up to now is folded again, replays included.
        identities = await store.profile_identities(pid)
        subjects = [subject_hash(r["kind"], r["value"]) for r in identities] + [subject_hash("profile_id", pid)]
        await store.add_tombstones(subjects, now)
        runtime.tombstones.add(subjects, to_ms(now))
        request_id = uuid.uuid4().hex
        await store.create_erasure_request(request_id, subject_hash("profile_id", pid), now)
        await runtime.dispatch([fold_message("erase", pid, requestId=request_id, erasedAt=to_ms(now))])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            done = await store.erasure_request(request_id)
            if done and done["completed_at"] is not None:
                return ORJSONResponse({"profile_id": pid, "status": "erased", "request_id": request_id,
                                       "events_deleted": done["events_deleted"]})
            await asyncio.sleep(0.1)
        return ORJSONResponse({"profile_id": pid, "status": "pending", "request_id": request_id},
                              status_code=202)

    return router


def _iso_dt(value: datetime | None) -> str | None:
    return None if value is None else iso(dt_to_ms(value))


__all__ = ["PROFILE_FOLD", "profiles_router"]
