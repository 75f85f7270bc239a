"""Loyalty HTTP API (bearer scopes ``loyalty:read`` / ``loyalty:write``): the program, accounts and
statements, redemptions, manual adjustments, reward codes, the schedule and a liability report."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from loyalist.auth import Credential, require_scope
from loyalist.http import ERROR_RESPONSES, ApiError
from services.profile.loyalty.domain import (
    Adjust,
    Ledger,
    LoyaltyError,
    Program,
    ProgramDefinition,
    expiring_summary,
    next_review_at,
    qualified_rank,
    qualifying_total,
)
from services.profile.loyalty.domain.ledger import redemption_to_dict
from services.profile.loyalty.service import Contended, LoyaltyService
from services.profile.loyalty.store import LedgerLine

log = logging.getLogger(__name__)
audit = logging.getLogger("loyalist.audit.loyalty")

ProfileId = Annotated[str, Path(min_length=1, max_length=200)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=120, pattern=r"^[A-Za-z0-9_.:-]+$")]
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"description": "Unknown reward, program version or code"},
    409: {"description": "Insufficient points, an idempotency key reused differently, or no program"},
    422: {"description": "Invalid request"},
    503: {"description": "The ledger is too contended or a dependency is down; retry"},
}


class ProgramVersionIn(ProgramDefinition):
    effective_from: datetime | None = Field(default=None, description="Default: now")


class RedemptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward_id: str = Field(min_length=1, max_length=80)
    idempotency_key: IdempotencyKey | None = Field(default=None, description="Or the Idempotency-Key header")


class AdjustmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: int = Field(description="Signed; non-zero", ge=-100_000_000, le=100_000_000)
    reason: str = Field(min_length=3, max_length=500, description="Why (kept in the ledger and the audit log)")
    idempotency_key: IdempotencyKey | None = None


def loyalty_service(request: Request) -> LoyaltyService:
    """FastAPI dependency: the loyalty service of this app (built on first use, see ``install``)."""
    get: Callable[[], LoyaltyService] | None = getattr(request.app.state, "loyalty", None)
    if get is None:
        raise ApiError(503, "not_ready", "loyalty is not installed in this service")
    try:
        return get()
    except RuntimeError as exc:
        raise ApiError(503, "not_ready", str(exc)) from exc


Service = Annotated[LoyaltyService, Depends(loyalty_service)]
Reader = Annotated[Credential, Depends(require_scope("loyalty:read"))]
Writer = Annotated[Credential, Depends(require_scope("loyalty:write"))]


def _line_json(line: LedgerLine) -> dict[str, Any]:
    e = line.event
    out: dict[str, Any] = {
        "seq": line.seq, "event_id": e.event_id, "kind": e.kind, "at": e.at, "points": e.points,
        "balance_after": line.balance_after, "reason": e.reason,
    }
    for key in ("order_id", "tier_from", "tier_to", "reward", "actor", "note", "expires_at", "unrecovered_points",
                "action"):
        if key in line.properties:
            out[key] = line.properties[key]
    return out


def account_json(ledger: Ledger, program: Program | None, now: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {
        "profile_id": ledger.profile_id, "balance": ledger.balance, "lifetime_points": ledger.lifetime_points,
        "tier": ledger.tier or (program.tiers[0].name if program else None), "tier_since": ledger.tier_since,
        "expiring": expiring_summary(ledger), "ledger_seq": ledger.seq,
        "redemptions": len(ledger.redemptions),
    }
    if program is not None:
        rank = program.tier_rank(ledger.tier)
        total = qualifying_total(ledger, program, now)
        qualifies_for = program.tiers[qualified_rank(ledger, program, now)].name
        out["qualifying"] = {"metric": program.tier_metric, "window_days": program.tier_window_days,
                             "total": str(total), "qualifies_for": qualifies_for}
        out["next_review_at"] = next_review_at(ledger, program, now)
        if rank + 1 < len(program.tiers):
            nxt = program.tiers[rank + 1]
            out["next_tier"] = {"name": nxt.name, "threshold": str(nxt.threshold),
                                "remaining": str(max(Decimal(0), nxt.threshold - total))}
        if program.point_value is not None:
            out["balance_value"] = str(program.point_value * ledger.balance)
    return out


def build_router() -> APIRouter:
    """The ``/v1/loyalty`` routes; the app's ``state.loyalty`` supplies the service."""
    router = APIRouter(prefix="/v1/loyalty", tags=["loyalty"], responses=RESPONSES)

    async def _program_or_404(service: LoyaltyService) -> Program:
        program = await service.current_program()
        if program is None:
            raise ApiError(404, "no_program", "no loyalty program is defined yet; PUT /v1/loyalty/program")
        return program

    async def _run(service: LoyaltyService, profile_id: str, command: Any) -> Any:
        try:
            return await service.handle(profile_id, command)
        except LoyaltyError as exc:
            error = ApiError(exc.status, exc.code, exc.message)
            error.details = dict(exc.details)
            raise error from exc
        except Contended as exc:
            raise ApiError(503, "contended", str(exc), headers={"Retry-After": "1"}) from exc

    @router.put("/program", status_code=201, summary="Define the program (stores a new version)")
    async def put_program(body: ProgramVersionIn, service: Service, cred: Writer) -> dict[str, Any]:
        now = service.clock()
        definition = ProgramDefinition.model_validate(body.model_dump(exclude={"effective_from"}))
        program = await service.programs.create(
            definition, effective_from=body.effective_from or now, actor=cred.name, now=now
        )
        audit.info("program version %s stored by %s (effective %s)", program.version, cred.name,
                   program.effective_from.isoformat())
        return program.model_dump(mode="json")

    @router.get("/program", summary="The program version in force now")
    async def get_program(service: Service, _: Reader) -> dict[str, Any]:
        return (await _program_or_404(service)).model_dump(mode="json")

    @router.get("/program/versions", summary="Every stored program version")
    async def list_versions(service: Service, _: Reader) -> dict[str, Any]:
        versions = await service.programs.versions(fresh=True)
        return {"versions": [{"version": p.version, "effective_from": p.effective_from, "created_at": p.created_at,
                              "created_by": p.created_by} for p in versions]}

    @router.get("/program/versions/{version}", summary="One program version")
    async def get_version(version: Annotated[int, Path(ge=1)], service: Service, _: Reader) -> dict[str, Any]:
        for program in await service.programs.versions(fresh=True):
            if program.version == version:
                return program.model_dump(mode="json")
        raise ApiError(404, "not_found", f"no program version {version}")

    @router.get("/rewards", summary="The rewards catalogue of the program in force")
    async def rewards(service: Service, _: Reader) -> dict[str, Any]:
        program = await _program_or_404(service)
        return {"program_version": program.version,
                "rewards": [r.model_dump(mode="json") for r in program.rewards if r.active]}

    @router.get("/accounts/{profile_id}", summary="A customer's balance, tier and expiring points")
    async def account(profile_id: ProfileId, service: Service, _: Reader) -> dict[str, Any]:
        ledger, _version = await service.store.load(profile_id)
        now = service.clock()
        return account_json(ledger, await service.program_at(now), now)

    @router.get("/accounts/{profile_id}/statement", summary="Ledger lines with the running balance, paged")
    async def statement(
        profile_id: ProfileId, service: Service, _: Reader,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        order: Literal["desc", "asc"] = "desc",
        cursor: Annotated[int | None, Query(ge=0, le=2**62, description="next_cursor of the previous page")] = None,
    ) -> dict[str, Any]:
        if order == "desc":
            before = cursor if cursor is not None else 2**62
            lines = await service.store.lines_before(profile_id, before, limit)
        else:
            lines = await service.store.lines_after(profile_id, cursor or 0, limit)
        next_cursor = lines[-1].seq if len(lines) == limit else None
        return {"profile_id": profile_id, "order": order, "lines": [_line_json(line) for line in lines],
                "next_cursor": next_cursor}

    @router.post("/accounts/{profile_id}/redemptions", summary="Redeem a reward (idempotent)",
                 status_code=201)
    async def redeem(
        profile_id: ProfileId, body: RedemptionIn, response: Response, service: Service, cred: Writer,
        idempotency_header: Annotated[str | None, Header(alias="Idempotency-Key", max_length=120)] = None,
    ) -> dict[str, Any]:
        key = body.idempotency_key or idempotency_header
        if not key:
            raise ApiError(422, "missing_idempotency_key", "send idempotency_key or an Idempotency-Key header")
        outcome = await _run(service, profile_id, service.redeem_command(profile_id, body.reward_id, key))
        redemption = outcome.ledger.redemptions[key]
        if not outcome.events:
            response.status_code = 200  # a retry: the first answer again
        else:
            audit.info("redemption %s of %s for %s by %s", redemption.event_id, redemption.reward_id, profile_id,
                       cred.name)
        return {"profile_id": profile_id, "redemption": redemption_to_dict(redemption),
                "balance": outcome.ledger.balance, "replayed": not outcome.events}

    @router.post("/accounts/{profile_id}/adjustments", summary="Manual adjustment with a reason (audited)",
                 status_code=201)
    async def adjust(
        profile_id: ProfileId, body: AdjustmentIn, response: Response, request: Request, service: Service,
        cred: Writer,
        idempotency_header: Annotated[str | None, Header(alias="Idempotency-Key", max_length=120)] = None,
    ) -> dict[str, Any]:
        if body.points == 0:
            raise ApiError(422, "validation_error", "points: must not be zero")
        key = body.idempotency_key or idempotency_header
        if not key:
            raise ApiError(422, "missing_idempotency_key", "send idempotency_key or an Idempotency-Key header")
        actor = f"{cred.name} ({cred.source})" if cred.source != cred.name else cred.name
        outcome = await _run(service, profile_id, Adjust(body.points, body.reason.strip(), actor, key))
        event_id = outcome.ledger.adjustments.get(key)
        if not outcome.events:
            response.status_code = 200
        else:
            client = request.client.host if request.client else "-"
            audit.info("adjustment %s of %+d points for %s by %s from %s: %s", event_id, body.points, profile_id,
                       actor, client, body.reason)
        return {"profile_id": profile_id, "event_id": event_id, "balance": outcome.ledger.balance,
                "replayed": not outcome.events}

    @router.get("/codes/{code}", summary="Look up a reward code (e.g. at checkout)")
    async def code(code: Annotated[str, Path(min_length=3, max_length=60)], service: Service,
                   _: Reader) -> dict[str, Any]:
        row = await service.store.get_code(code)
        if row is None:
            raise ApiError(404, "not_found", "unknown reward code")
        return row

    @router.post("/schedule/run", summary="Hold every expiry and tier review due now")
    async def run_schedule(service: Service, cred: Writer) -> dict[str, Any]:
        now = service.clock()
        handled = await service.run_due(now)
        audit.info("schedule run by %s at %s: %d accounts", cred.name, now.isoformat(), handled)
        return {"now": now, "accounts": handled}

    @router.get("/report", summary="Tier distribution and points liability (scans every account)")
    async def report(service: Service, _: Reader) -> dict[str, Any]:
        program = await service.current_program()
        entry = program.tiers[0].name if program else None
        tiers: Counter[str] = Counter()
        accounts = liability = lifetime = 0
        async for row in service.store.accounts():
            accounts += 1
            tiers[row["tier"] or entry or "none"] += 1
            liability += int(row["balance"])
            lifetime += int(row["lifetime_points"] or 0)
        out: dict[str, Any] = {"accounts": accounts, "tier_distribution": dict(tiers),
                               "points_liability": liability, "lifetime_points": lifetime}
        if program is not None and program.point_value is not None:
            out["liability_value"] = str(program.point_value * liability)
            out["currency"] = program.base_currency
        return out

    return router
