"""Segment-compatible HTTP Tracking API: ``POST /v1/identify|track|page|screen|group|alias|batch``.

Also mounted under the first-party prefix (``IngestConfig.first_party_prefix``) so a shop can proxy it
from its own domain.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from loyalist.events import utcnow
from loyalist.http import ApiError
from services.ingest.api.docs import BATCH_BODY, CALL_BODIES, RESPONSES, SUCCESS
from services.ingest.api.plumbing import authenticate, header_write_key, json_response, parse_json, read_body
from services.ingest.domain.tracking import MessageRejected, parse_timestamp
from services.ingest.metrics import BATCH_SIZE
from services.ingest.pipeline import Ingestor

CALL_TYPES = ("identify", "track", "page", "screen", "group", "alias")
_SUMMARIES = {
    "identify": "Identify a customer and record traits",
    "track": "Record an action the customer performed",
    "page": "Record a page view",
    "screen": "Record a mobile screen view",
    "group": "Associate the customer with a group",
    "alias": "Tie a previous id to a user id",
}


def ingestor(request: Request) -> Ingestor:
    found = getattr(request.app.state, "ingestor", None)
    if found is None:
        raise ApiError(503, "not_ready", "ingest is starting", headers={"Retry-After": "1"})
    return found  # type: ignore[no-any-return]


def _single_handler(call_type: str) -> Any:
    async def handle(request: Request) -> Response:
        received_at = utcnow()
        pipeline = ingestor(request)
        header_key = header_write_key(request)
        body = parse_json(await read_body(request, pipeline.config.max_message_bytes))
        credential = await authenticate(request, header_key, body)
        prepared, rejected = pipeline.prepare_calls(
            [body], call_type=call_type, source=credential.source, received_at=received_at, check_size=False
        )
        if rejected:
            first = rejected[0]
            raise ApiError(400, first.code, first.message)
        outcome = await pipeline.publish(prepared, source=credential.source, limiter_id=credential.name)
        return json_response({"success": True, "duplicate": outcome.duplicates > 0})

    handle.__name__ = f"{call_type}_call"
    return handle


async def batch_call(request: Request) -> Response:
    received_at = utcnow()
    pipeline = ingestor(request)
    config = pipeline.config
    header_key = header_write_key(request)
    body = parse_json(await read_body(request, config.max_batch_bytes))
    credential = await authenticate(request, header_key, body)
    if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
        raise ApiError(400, "invalid_batch", "the body must be an object with a 'batch' array of messages")
    messages = body["batch"]
    if len(messages) > config.max_batch_messages:
        raise ApiError(413, "too_many_messages",
                       f"a batch may hold at most {config.max_batch_messages} messages, got {len(messages)}",
                       limit=config.max_batch_messages)
    BATCH_SIZE.observe(len(messages))
    context, integrations = body.get("context"), body.get("integrations")
    try:
        sent_at = parse_timestamp(body.get("sentAt"), "sentAt")
    except MessageRejected as exc:
        raise ApiError(400, exc.code, exc.message) from exc
    prepared, rejected = await pipeline.prepare_batch(
        messages, source=credential.source, received_at=received_at, batch_sent_at=sent_at,
        batch_context=context if isinstance(context, dict) else None,
        batch_integrations=integrations if isinstance(integrations, dict) else None,
    )
    outcome = await pipeline.publish(prepared, source=credential.source, limiter_id=credential.name)
    summary = {"accepted": outcome.accepted, "duplicates": outcome.duplicates}
    if rejected:
        raise ApiError(
            400, "invalid_messages",
            f"{len(rejected)} of {len(messages)} messages were rejected; the other {outcome.accepted} were accepted",
            success=False, accepted=outcome.accepted, duplicates=outcome.duplicates,
            rejected=[r.as_dict() for r in rejected],
        )
    return json_response({"success": True, **summary})


_HANDLERS = {call_type: _single_handler(call_type) for call_type in CALL_TYPES}


def tracking_endpoints(prefix: str = "") -> dict[str, Any]:
    """Path → endpoint of every tracking route (what :class:`TrackingFastPath` serves directly)."""
    return {**{f"{prefix}/v1/{t}": handler for t, handler in _HANDLERS.items()}, f"{prefix}/v1/batch": batch_call}


def tracking_router(prefix: str = "", *, include_in_schema: bool = True) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["tracking"], include_in_schema=include_in_schema)
    for call_type in CALL_TYPES:
        router.add_api_route(
            f"/v1/{call_type}", _HANDLERS[call_type], methods=["POST"], summary=_SUMMARIES[call_type],
            response_model=SUCCESS, responses=RESPONSES, openapi_extra=CALL_BODIES[call_type],
            operation_id=f"{call_type}{'_first_party' if prefix else ''}",
        )
    router.add_api_route(
        "/v1/batch", batch_call, methods=["POST"], summary="Send up to 2,500 calls of any type at once",
        response_model=SUCCESS, responses=RESPONSES, openapi_extra=BATCH_BODY,
        operation_id=f"batch{'_first_party' if prefix else ''}",
    )
    return router
