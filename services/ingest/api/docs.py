"""OpenAPI descriptions of the tracking API's bodies and answers. Handlers read raw JSON for speed and
exact Segment semantics, so the request schemas are declared here, by hand, to match what they accept."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.ingest.domain.tracking import NON_BLANK_PATTERN


class TrackingResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    success: bool = Field(description="true once Kafka acknowledged every event of the call")
    duplicate: bool | None = Field(default=None, description="single calls: the messageId was already accepted")
    accepted: int | None = Field(default=None, description="batch: messages accepted (including duplicates)")
    duplicates: int | None = Field(default=None, description="batch: messages already accepted before")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="machine-readable reason, e.g. invalid_json, missing_identity, body_too_large")
    message: str


SUCCESS = TrackingResponse

_ERROR = {"model": ErrorBody}
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid JSON or message. Batches list each rejected message "
          "(`rejected: [{index, code, message}]`) and keep the valid ones (`accepted`)."},
    401: {**_ERROR, "description": "Missing, unknown or revoked write key"},
    413: {**_ERROR, "description": "Body over 32 KB (single call) or 500 KB (batch), or over 2,500 messages"},
    415: {**_ERROR, "description": "Content-Encoding other than gzip/deflate"},
    422: {**_ERROR, "description": "Mapped event violates its schema"},
    429: {**_ERROR, "description": "Rate limit of the write key exceeded; see Retry-After",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
    503: {**_ERROR, "description": "Kafka (or the credential store) unavailable; nothing was half-written. "
          "Retry after Retry-After seconds.",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
}

_ID = {"type": ["string", "number", "null"], "maxLength": 200, "description": "string (numbers are stringified)"}
_OBJ = {"type": ["object", "null"]}
_TIME = {"type": ["string", "null"], "format": "date-time", "pattern": "^[12][0-9]{3}-",
         "description": "ISO 8601 / RFC 3339, years 1000-2999"}

COMMON_PROPERTIES: dict[str, Any] = {
    "userId": {**_ID, "description": "your id of the customer"},
    "anonymousId": {**_ID, "description": "a device/browser id, before the customer is known"},
    "messageId": {**_ID, "description": "unique per message; generated when absent. Resends with the same "
                  "messageId (per source) within 8 days are acknowledged but not counted twice"},
    "timestamp": {**_TIME, "description": "when it happened on the client (becomes originalTimestamp)"},
    "originalTimestamp": _TIME,
    "sentAt": {**_TIME, "description": "when the client sent it; used to correct client clock skew"},
    "context": {**_OBJ, "description": "ip, userAgent, page, library, locale, campaign ..."},
    "integrations": _OBJ,
    "writeKey": {"type": "string", "description": "alternative to HTTP Basic authentication"},
}
# Blank strings count as absent, so "present" means a non-blank string or a number.
_PRESENT_ID = {"type": ["string", "number"], "pattern": NON_BLANK_PATTERN, "maxLength": 200}
_IDENTITY = {"anyOf": [{"required": ["userId"], "properties": {"userId": _PRESENT_ID}},
                       {"required": ["anonymousId"], "properties": {"anonymousId": _PRESENT_ID}}]}


def _call(kind: str, extra: dict[str, Any], required: list[str], description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "title": f"{kind.capitalize()}Call",
        "description": description,
        "properties": {**COMMON_PROPERTIES, "type": {"type": "string", "const": kind}, **extra},
        "required": required,
    }
    if kind != "alias":
        schema.update(_IDENTITY)
    return schema


CALL_SCHEMAS: dict[str, dict[str, Any]] = {
    "identify": _call("identify", {"traits": {**_OBJ, "description": "email, phone, name, address ..."}}, [],
                      "Who the customer is"),
    "track": _call("track", {"event": {"type": "string", "minLength": 1, "pattern": NON_BLANK_PATTERN},
                             "properties": _OBJ}, ["event"],
                   "An action; canonical e-commerce names (Order Completed ...) are checked against their schema"),
    "page": _call("page", {"name": {"type": ["string", "null"]}, "category": {"type": ["string", "null"]},
                           "properties": _OBJ}, [], "A page view"),
    "screen": _call("screen", {"name": {"type": ["string", "null"]}, "category": {"type": ["string", "null"]},
                               "properties": _OBJ}, [], "A mobile screen view"),
    "group": _call("group", {"groupId": _PRESENT_ID, "traits": _OBJ}, ["groupId"],
                   "Membership of a group"),
    "alias": _call("alias", {"previousId": _PRESENT_ID, "userId": _PRESENT_ID},
                   ["previousId", "userId"], "previousId and userId name the same customer"),
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


CALL_BODIES = {kind: _body(schema) for kind, schema in CALL_SCHEMAS.items()}

BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Batch",
    "required": ["batch"],
    "properties": {
        "batch": {
            "type": "array", "maxItems": 2500,
            "items": {"oneOf": [
                {**schema, "required": [*schema["required"], "type"]} for schema in CALL_SCHEMAS.values()
            ]},
        },
        "sentAt": _TIME,
        "context": {**_OBJ, "description": "merged into every message's context (the message's keys win)"},
        "integrations": _OBJ,
        "writeKey": {"type": "string"},
    },
}
BATCH_BODY = _body(BATCH_SCHEMA)
