"""Request plumbing shared by ingest's routers: bounded body reading (with gzip), JSON parsing, write-key
authentication. Every failure is an ``ApiError`` with a machine-readable code."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from fastapi import Request, Response

from loyalist.auth import Credential, basic_auth_username, credential_store
from loyalist.http import ApiError
from services.ingest.domain.tracking import write_key_from_body
from services.ingest.metrics import EVENTS_REJECTED


def json_response(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def too_large(limit: int, what: str = "request body") -> ApiError:
    EVENTS_REJECTED.labels("unknown", "body_too_large").inc()
    return ApiError(413, "body_too_large", f"the {what} may not exceed {limit} bytes", limit=limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed when ``Content-Encoding: gzip``; 413 beyond ``limit`` bytes
    (checked on the decompressed size too, so a small gzip bomb cannot get through)."""
    declared = request.headers.get("content-length")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, auto-detected
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, "invalid_encoding", "the body is not valid gzip") from exc
    if len(body) > limit or inflater.unconsumed_tail:
        raise too_large(limit)
    return body


def parse_json(body: bytes) -> Any:
    if not body:
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        EVENTS_REJECTED.labels("unknown", "invalid_json").inc()
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc


def header_write_key(request: Request) -> str | None:
    return basic_auth_username(request.headers.get("authorization"))


async def authenticate(request: Request, header_key: str | None, body: Any) -> Credential:
    """Segment's rule: the write key is the HTTP Basic username (empty password), or ``writeKey`` in the
    body for clients that cannot set headers (``navigator.sendBeacon``)."""
    key = header_key or write_key_from_body(body)
    if not key:
        EVENTS_REJECTED.labels("unknown", "missing_write_key").inc()
        raise ApiError(401, "missing_write_key",
                       "send the write key as the HTTP Basic username (empty password) or as writeKey in the body",
                       headers={"WWW-Authenticate": 'Basic realm="loyalist"'})
    try:
        credential = await credential_store(request).lookup(key)
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(503, "credentials_unavailable", "write keys cannot be checked right now; retry later",
                       headers={"Retry-After": "5"}) from exc
    if credential is None or credential.kind != "write_key":
        EVENTS_REJECTED.labels("unknown", "invalid_write_key").inc()
        raise ApiError(401, "invalid_write_key", "the write key is unknown or revoked",
                       headers={"WWW-Authenticate": 'Basic realm="loyalist"'})
    return credential
