"""Segmenter HTTP API: segments (CRUD, preview, members), a customer's segments and recommendations, RFM
boundaries, and the CLV/churn models (backtest, refit, status)."""

from __future__ import annotations

import asyncio
import re
import secrets
from datetime import UTC, date, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from loyalist.auth import require_scope
from loyalist.http import ApiError
from services.segmenter.domain.clv import FitError
from services.segmenter.domain.rfm import rfm_values
from services.segmenter.domain.rules import RuleError, parse_rule
from services.segmenter.engine import SegmenterEngine
from services.segmenter.models import ModelRuntime
from services.segmenter.store import StoredSegment

segments_router = APIRouter(prefix="/v1", tags=["segments"])
models_router = APIRouter(prefix="/v1/models", tags=["models"])

_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def engine(request: Request) -> SegmenterEngine:
    found = getattr(request.app.state, "engine", None)
    if found is None:
        raise ApiError(503, "not_ready", "the segmenter is starting")
    return found  # type: ignore[no-any-return]


def model_runtime(request: Request) -> ModelRuntime:
    found = getattr(request.app.state, "models", None)
    if found is None:
        raise ApiError(503, "not_ready", "the segmenter is starting")
    return found  # type: ignore[no-any-return]


def invalid_rule(exc: RuleError, prefix: str = "$.rule") -> ApiError:
    path = prefix + exc.path[1:]
    return ApiError(400, "invalid_rule", f"{path}: {exc.reason}", path=path)


class SegmentCreate(BaseModel):
    id: str | None = Field(default=None, description="Optional stable id ([a-z0-9_-], max 64); generated if absent")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    rule: Any = Field(description="A rule document (docs/segmenter.md)")


class SegmentUpdate(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    rule: Any = None


class PreviewRequest(BaseModel):
    rule: Any
    sample_size: int = Field(default=20, ge=0, le=500)


def segment_body(row: StoredSegment, members: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row.segment_id, "name": row.name, "description": row.description, "rule": row.definition,
        "version": row.version, "created_at": row.created_at.isoformat(), "updated_at": row.updated_at.isoformat(),
        "backfill": {"status": row.backfill_status, "done": row.backfill_done, "total": row.backfill_total},
    }
    if members is not None:
        body["members"] = members
    return body


async def _fresh_row(eng: SegmenterEngine, segment_id: str) -> StoredSegment:
    row = await eng.store.segment(segment_id)
    if row is None:
        raise ApiError(404, "segment_not_found", f"no segment {segment_id!r}")
    return row


@segments_router.post("/segments", status_code=201, summary="Create a segment (backfilled over existing profiles)",
                      dependencies=[Depends(require_scope("segments:write"))])
async def create_segment(body: SegmentCreate, eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    segment_id = body.id or f"seg_{secrets.token_hex(6)}"
    if not _ID.match(segment_id):
        raise ApiError(400, "invalid_id", "id must match [a-z0-9][a-z0-9_-]{0,63}", path="$.id")
    if await eng.store.segment(segment_id) is not None:
        raise ApiError(409, "segment_exists", f"a segment {segment_id!r} already exists")
    try:
        eng.parse_segment(segment_id, body.name, body.rule, 1)
    except RuleError as exc:
        raise invalid_rule(exc) from None
    now = datetime.now(UTC)
    row = StoredSegment(segment_id, body.name, body.description, body.rule, 1, now, now, "pending", 0, 0)
    await eng.save_segment(row)
    return segment_body(row)


@segments_router.get("/segments", summary="List segments", dependencies=[Depends(require_scope("segments:read"))])
async def list_segments(eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    rows = sorted(await eng.store.segments(), key=lambda r: r.created_at)
    return {"segments": [segment_body(r) for r in rows]}


@segments_router.get("/segments/{segment_id}", summary="A segment with its size and backfill progress",
                     dependencies=[Depends(require_scope("segments:read"))])
async def get_segment(segment_id: str, eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    row = await _fresh_row(eng, segment_id)
    return segment_body(row, await eng.store.member_count(segment_id))


@segments_router.put("/segments/{segment_id}", summary="Change a segment (re-evaluated over every profile)",
                     dependencies=[Depends(require_scope("segments:write"))])
async def update_segment(segment_id: str, body: SegmentUpdate, eng: SegmenterEngine = Depends(engine)
                         ) -> dict[str, Any]:
    row = await _fresh_row(eng, segment_id)
    rule = body.rule if body.rule is not None else row.definition
    name = body.name or row.name
    try:
        eng.parse_segment(segment_id, name, rule, row.version + 1)
    except RuleError as exc:
        raise invalid_rule(exc) from None
    updated = StoredSegment(segment_id, name, row.description if body.description is None else body.description,
                            rule, row.version + 1, row.created_at, datetime.now(UTC), "pending", 0, 0)
    await eng.save_segment(updated)
    return segment_body(updated)


@segments_router.delete("/segments/{segment_id}", status_code=204, summary="Delete a segment (members exit)",
                        dependencies=[Depends(require_scope("segments:write"))])
async def delete_segment(segment_id: str, eng: SegmenterEngine = Depends(engine)) -> Response:
    await _fresh_row(eng, segment_id)
    try:
        await eng.delete_segment(segment_id)
    except RuleError as exc:
        raise ApiError(409, "segment_in_use", exc.reason) from None
    return Response(status_code=204)


@segments_router.post("/segments/preview", summary="Size and sample members of a rule, without saving it",
                      dependencies=[Depends(require_scope("segments:read"))])
async def preview_segment(body: PreviewRequest, eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    try:
        rule = parse_rule(body.rule)
        eng.parse_segment("__preview__", "preview", body.rule, 1)
    except RuleError as exc:
        raise invalid_rule(exc) from None
    result = await eng.preview(rule, body.sample_size)
    return {"size": result.size, "scanned": result.scanned, "sample": result.sample}


@segments_router.get("/segments/{segment_id}/members", summary="Current members, paged by profile id",
                     dependencies=[Depends(require_scope("segments:read"))])
async def segment_members(segment_id: str, limit: int = Query(100, ge=1, le=1000), cursor: str = "",
                          eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    await _fresh_row(eng, segment_id)
    rows = await eng.store.members(segment_id, cursor, limit)
    members = [{"profile_id": r["profile_id"], "since": r["since"].replace(tzinfo=UTC).isoformat()} for r in rows]
    return {"segment_id": segment_id, "members": members,
            "next_cursor": members[-1]["profile_id"] if len(members) == limit else None}


@segments_router.get("/profiles/{profile_id}/segments", summary="A customer's segments, RFM and lifecycle stage",
                     dependencies=[Depends(require_scope("segments:read"))])
async def profile_segments(profile_id: str, eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    stored = await eng.store.profile(profile_id)
    memberships = await eng.store.memberships(profile_id)
    names = {s.segment_id: s.name for s in eng.segments}
    segments = [{"id": sid, "name": names[sid]} for sid, (member, _) in sorted(memberships.items())
                if member and sid in names]
    body: dict[str, Any] = {"profile_id": profile_id, "segments": segments}
    if stored is not None and not stored.deleted:
        from services.segmenter.domain.membership import CustomerFacts, build_context

        ctx = build_context(CustomerFacts(stored.document, (), stored.won_back_at, stored.predictions), eng.scorer,
                            eng.thresholds, datetime.now(UTC))
        values = rfm_values(stored.document)
        scores = eng.scorer.scores(values) if values is not None and eng.scorer.n else None
        body.update({
            "lifecycle_stage": ctx.lifecycle_stage,
            "rfm": None if scores is None else {"r": scores.r, "f": scores.f, "m": scores.m,
                                                "segment": scores.segment},
            "predictions": dict(ctx.predictions),
        })
    elif not segments:
        raise ApiError(404, "profile_not_found", f"the segmenter has not seen profile {profile_id!r}")
    return body


@segments_router.get("/profiles/{profile_id}/recommendations",
                     summary="Products bought by customers who bought what this customer bought",
                     dependencies=[Depends(require_scope("segments:read"))])
async def profile_recommendations(profile_id: str, limit: int = Query(10, ge=1, le=100),
                                  eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    recs = eng.copurchases.recommend_for(profile_id, limit)
    return {"profile_id": profile_id, "bought": sorted(eng.copurchases.bought.get(profile_id, set())),
            "recommendations": [{"product_id": p, "score": n} for p, n in recs]}


@segments_router.get("/products/{product_id}/also-bought", summary="Customers who bought X also bought Y",
                     dependencies=[Depends(require_scope("segments:read"))])
async def also_bought(product_id: str, limit: int = Query(10, ge=1, le=100),
                      eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    return {"product_id": product_id,
            "also_bought": [{"product_id": p, "customers": n} for p, n in eng.copurchases.also_bought(product_id,
                                                                                                   limit)]}


@segments_router.get("/rfm", summary="Live RFM quintile boundaries and population size",
                     dependencies=[Depends(require_scope("segments:read"))])
async def rfm_boundaries(eng: SegmenterEngine = Depends(engine)) -> dict[str, Any]:
    return {"customers": eng.scorer.n, "boundaries": eng.scorer.boundaries()}


# ---- models --------------------------------------------------------------------------------------


class Population(BaseModel):
    trait: str = Field(min_length=1)
    equals: Any


class BacktestRequest(BaseModel):
    calibration_end: date
    holdout_end: date
    period_days: int = Field(default=7, ge=1, le=366)
    population: Population | None = None
    per_customer_limit: int = Field(default=100, ge=0, le=100_000)


@models_router.post("/clv/backtest", summary="Fit BG/NBD + Gamma-Gamma up to a date; predicted vs actual after it",
                    dependencies=[Depends(require_scope("models:read"))])
async def clv_backtest(body: BacktestRequest, runtime: ModelRuntime = Depends(model_runtime)) -> dict[str, Any]:
    if body.holdout_end <= body.calibration_end:
        raise ApiError(400, "invalid_window", "holdout_end must be after calibration_end", path="$.holdout_end")
    population = None if body.population is None else (body.population.trait, body.population.equals)
    try:
        result = await runtime.backtest(body.calibration_end, body.holdout_end, body.period_days, population,
                                        body.per_customer_limit)
    except FitError as exc:
        raise ApiError(422, "cannot_fit", str(exc)) from None
    return result.to_dict()


@models_router.post("/clv/refit", summary="Refit CLV now over the live customers and write predictions",
                    dependencies=[Depends(require_scope("models:write"))])
async def clv_refit(runtime: ModelRuntime = Depends(model_runtime)) -> dict[str, Any]:
    try:
        return await runtime.refit_and_predict()
    except FitError as exc:
        raise ApiError(422, "cannot_fit", str(exc)) from None


@models_router.get("", summary="Model versions and progressive metrics",
                   dependencies=[Depends(require_scope("models:read"))])
async def models_status(runtime: ModelRuntime = Depends(model_runtime)) -> dict[str, Any]:
    return await asyncio.shield(runtime.status())
