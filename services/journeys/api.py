"""Journey API: definitions, lifecycle, templates, instances, measurement and backtests."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from loyalist.auth import require_scope
from loyalist.events import decode_event
from loyalist.http import ApiError
from services.journeys.domain.backtest import HistoricalFact, backtest
from services.journeys.domain.codec import instance_to_doc
from services.journeys.domain.definition import InvalidDefinition, JourneyDefinition, parse_definition
from services.journeys.domain.engine import SegmentTrigger
from services.journeys.domain.stats import summarize
from services.journeys.domain.templates import TEMPLATES, TemplateParamError, build_template
from services.journeys.gauges import publish_stats
from services.journeys.history import EventHistory
from services.journeys.runner import Registry, _event_trigger
from services.journeys.store import InstanceStore, JourneyRow, JourneyStore

READ = Depends(require_scope("journeys:read"))
WRITE = Depends(require_scope("journeys:write"))
STATUSES = ("draft", "active", "paused", "archived")
TRANSITIONS = {"activate": "active", "pause": "paused", "archive": "archived"}


def _now() -> datetime:
    return datetime.now(UTC)


def _journeys(request: Request) -> JourneyStore:
    return request.app.state.journey_store  # type: ignore[no-any-return]


def _instances(request: Request) -> InstanceStore:
    return request.app.state.instance_store  # type: ignore[no-any-return]


def _registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


def validate(raw: Any) -> JourneyDefinition:
    """The parsed definition, or a 400 naming the offending node."""
    try:
        return parse_definition(raw)
    except InvalidDefinition as exc:
        first = exc.problems[0]
        raise ApiError(400, "invalid_journey", f"{first.where}: {first.message}", node=first.where,
                       problems=[p.as_dict() for p in exc.problems]) from None


def _definition_body(payload: dict[str, Any]) -> dict[str, Any]:
    # "id" and "status" travel with YAML files for `apply`; they are not part of the versioned definition.
    return {k: v for k, v in payload.items() if k not in ("id", "status")}


async def _get_row(request: Request, journey_id: str) -> JourneyRow:
    row = await _journeys(request).get(journey_id)
    if row is None:
        raise ApiError(404, "journey_not_found", f"no journey '{journey_id}'")
    return row


async def _present(request: Request, row: JourneyRow) -> dict[str, Any]:
    definition = await _journeys(request).definition(row.journey_id, row.current_version)
    return {**row.as_dict(), "definition": definition}


async def _create(request: Request, journey_id: str, raw: dict[str, Any], template_id: str | None) -> dict[str, Any]:
    definition = validate(raw)
    created = await _journeys(request).create(journey_id, definition.name, raw, template_id, _now())
    if not created:
        raise ApiError(409, "journey_exists", f"journey '{journey_id}' already exists; PUT to update it")
    await _registry(request).refresh()
    return await _present(request, await _get_row(request, journey_id))


def journeys_router() -> APIRouter:
    router = APIRouter(prefix="/v1/journeys", tags=["journeys"])

    @router.get("", dependencies=[READ], summary="List journeys")
    async def list_journeys(request: Request, status: str | None = Query(None)) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise ApiError(400, "invalid_status", f"status must be one of {', '.join(STATUSES)}")
        rows = await _journeys(request).all()
        return {"journeys": [r.as_dict() for r in rows if status is None or r.status == status]}

    @router.post("", status_code=201, dependencies=[WRITE], summary="Create a journey (draft, version 1)")
    async def create_journey(request: Request, payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        journey_id = payload.get("id") or f"jrn_{secrets.token_hex(6)}"
        _check_id(journey_id)
        return await _create(request, journey_id, _definition_body(payload), None)

    @router.post("/validate", dependencies=[READ], summary="Validate a definition without saving it")
    async def validate_journey(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        definition = validate(_definition_body(payload))
        return {"valid": True, "nodes": list(definition.nodes), "start": definition.start}

    @router.get("/templates", dependencies=[READ], summary="Journey templates shipped with the product")
    async def list_templates() -> dict[str, Any]:
        return {"templates": [t.describe() for t in TEMPLATES.values()]}

    @router.post("/from-template/{template_id}", status_code=201, dependencies=[WRITE],
                 summary="Create a journey from a shipped template with parameters (ISO 8601 durations)")
    async def from_template(request: Request, template_id: str,
                            payload: dict[str, Any] | None = Body(None)) -> dict[str, Any]:
        if template_id not in TEMPLATES:
            raise ApiError(404, "template_not_found", f"no template '{template_id}' (see GET /v1/journeys/templates)")
        body = dict(payload or {})
        # Parameters may come flat ({"first_reminder_after": "PT5S"}) or under "params"; "name"/"id" are ours.
        name = body.pop("name", None)
        journey_id = body.pop("id", None) or f"jrn_{secrets.token_hex(6)}"
        _check_id(journey_id)
        params = body.pop("params", None) or body
        if not isinstance(params, dict):
            raise ApiError(400, "invalid_template_params", "parameters must be an object")
        try:
            raw = build_template(template_id, params)
        except TemplateParamError as exc:
            raise ApiError(400, "invalid_template_params", str(exc)) from None
        if name:
            raw["name"] = str(name)
        return await _create(request, journey_id, raw, template_id)

    @router.get("/{journey_id}", dependencies=[READ], summary="A journey with its current definition")
    async def get_journey(request: Request, journey_id: str) -> dict[str, Any]:
        row = await _get_row(request, journey_id)
        out = await _present(request, row)
        out["versions"] = await _journeys(request).versions(journey_id)
        return out

    @router.get("/{journey_id}/versions/{version}", dependencies=[READ], summary="One version's definition")
    async def get_version(request: Request, journey_id: str, version: int) -> dict[str, Any]:
        await _get_row(request, journey_id)
        definition = await _journeys(request).definition(journey_id, version)
        if definition is None:
            raise ApiError(404, "version_not_found", f"journey '{journey_id}' has no version {version}")
        return {"id": journey_id, "version": version, "definition": definition}

    @router.put("/{journey_id}", dependencies=[WRITE],
                summary="Create or update: a changed definition becomes a new version; running instances keep "
                        "theirs")
    async def put_journey(request: Request, journey_id: str, payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        _check_id(journey_id)
        raw = _definition_body(payload)
        definition = validate(raw)
        row = await _journeys(request).get(journey_id)
        if row is None:
            return await _create(request, journey_id, raw, None)
        current = await _journeys(request).definition(journey_id, row.current_version)
        if current == raw:
            return {**await _present(request, row), "changed": False}
        version = await _journeys(request).add_version(row, definition.name, raw, _now())
        if version is None:
            raise ApiError(409, "concurrent_update", "the journey changed meanwhile; fetch it and retry")
        await _registry(request).refresh()
        return {**await _present(request, await _get_row(request, journey_id)), "changed": True}

    @router.delete("/{journey_id}", status_code=204, dependencies=[WRITE], response_class=Response,
                   summary="Delete a journey that is not active (pause or archive it first)")
    async def delete_journey(request: Request, journey_id: str) -> None:
        row = await _get_row(request, journey_id)
        if row.status == "active":
            raise ApiError(409, "journey_active", "pause or archive the journey before deleting it")
        await _journeys(request).delete(journey_id)
        _registry(request).forget(journey_id)
        await _registry(request).refresh()

    @router.get("/{journey_id}/instances", dependencies=[READ],
                summary="A customer's instances of this journey, with their history")
    async def instances(
        request: Request, journey_id: str, profile_id: str = Query(..., min_length=1, max_length=200)
    ) -> dict[str, Any]:
        found = await _instances(request).for_profile(profile_id, journey_id)
        return {"instances": [instance_to_doc(i) for i in sorted(found, key=lambda i: i.entered_at)]}

    @router.get("/{journey_id}/stats", dependencies=[READ],
                summary="Entered / waiting / exited / converted per node, revenue, holdout uplift")
    async def stats(request: Request, journey_id: str) -> dict[str, Any]:
        row = await _get_row(request, journey_id)
        summary = summarize(await _instances(request).for_journey(journey_id))
        publish_stats(journey_id, summary)
        return {"id": journey_id, "status": row.status, "version": row.current_version, **summary}

    @router.post("/{journey_id}/backtest", dependencies=[READ],
                 summary="Replay a past period through this journey without sending anything")
    async def backtest_saved(request: Request, journey_id: str,
                             payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        row = await _get_row(request, journey_id)
        version = _positive_int(payload.get("version"), row.current_version, "version")
        raw = await _journeys(request).definition(journey_id, version)
        if raw is None:
            raise ApiError(404, "version_not_found", f"journey '{journey_id}' has no version {version}")
        return await _backtest(request, validate(raw), payload, journey_id)

    @router.post("/{journey_id}/{action}", dependencies=[WRITE],
                 summary="Lifecycle: activate, pause (no new entries) or archive")
    async def transition(request: Request, journey_id: str, action: str) -> dict[str, Any]:
        if action not in TRANSITIONS:
            raise ApiError(404, "not_found", f"unknown action '{action}' (activate, pause, archive)")
        row = await _get_row(request, journey_id)
        await _journeys(request).set_status(journey_id, TRANSITIONS[action], _now())
        await _registry(request).refresh()
        return await _present(request, await _get_row(request, row.journey_id))

    return router


def backtest_router() -> APIRouter:
    router = APIRouter(prefix="/v1/backtests", tags=["journeys"])

    @router.post("", dependencies=[READ], summary="Backtest an unsaved definition over a past period")
    async def backtest_definition(request: Request, payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return await _backtest(request, validate(payload.get("definition")), payload, "backtest")

    return router


def _check_id(journey_id: Any) -> None:
    if not isinstance(journey_id, str) or not journey_id or len(journey_id) > 100 or not all(
            c.isalnum() or c in "-_" for c in journey_id):
        raise ApiError(400, "invalid_id", "journey ids use letters, digits, '-' and '_' (at most 100)")


def _positive_int(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"invalid_{name}", f"'{name}' must be a positive integer")
    return value


def _period(payload: dict[str, Any]) -> tuple[datetime, datetime]:
    try:
        start = datetime.fromisoformat(str(payload["from"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(payload["to"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        raise ApiError(400, "invalid_period", "'from' and 'to' must be ISO 8601 timestamps") from None
    start = start if start.tzinfo else start.replace(tzinfo=UTC)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    if end <= start:
        raise ApiError(400, "invalid_period", "'to' must be after 'from'")
    return start, end


def facts_from_wire(items: Any) -> list[HistoricalFact]:
    """Facts given inline, in the topics' wire shapes: ``{"profileId", "event"}`` (events.resolved) or
    ``{"profileId", "segmentId", "change", "at"}`` (segment.membership)."""
    if not isinstance(items, list):
        raise ApiError(400, "invalid_events", "'events' must be a list")
    facts: list[HistoricalFact] = []
    for i, item in enumerate(items):
        try:
            pid = str(item["profileId"])
            if "event" in item:
                event = decode_event(item["event"])
                facts.append(HistoricalFact(pid, event.timestamp, _event_trigger(event)))
            else:
                if item.get("change") not in ("entered", "exited"):
                    raise ValueError("change must be 'entered' or 'exited'")
                at = datetime.fromisoformat(str(item["at"]).replace("Z", "+00:00"))
                at = at if at.tzinfo else at.replace(tzinfo=UTC)
                facts.append(HistoricalFact(pid, at, SegmentTrigger(str(item["segmentId"]), item["change"], at)))
        except Exception as exc:
            raise ApiError(400, "invalid_events", f"events[{i}]: {exc}") from None
    return facts


async def _backtest(request: Request, definition: JourneyDefinition, payload: dict[str, Any],
                    journey_id: str) -> dict[str, Any]:
    start, end = _period(payload)
    profiles = payload.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ApiError(400, "invalid_profiles", "'profiles' must map profile ids to profile documents")
    if "events" in payload:
        facts = facts_from_wire(payload["events"])
        source = "request"
    else:
        history: EventHistory = request.app.state.event_history
        if not await history.available():
            raise ApiError(400, "no_event_history", "no stored event history is available in this deployment; "
                                                    "pass the facts as 'events'")
        facts = await history.facts(start, end, limit=_positive_int(payload.get("limit"), 200_000, "limit"))
        source = history.describe()
        if not profiles:
            profiles = await history.profiles({f.profile_id for f in facts})
    report = backtest(definition, facts, start, end, profiles, journey_id=journey_id)
    return {"source": source, **report}
