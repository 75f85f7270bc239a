"""Credentials shared by all services: ingest write keys and scoped bearer API tokens.

Only SHA-256 hashes of tokens are stored (tokens are random, high-entropy secrets, so a fast hash is the
standard choice; it keeps per-request checks cheap). Lookups are cached in-process for a short TTL.

Scopes: ``track`` (write keys), and for API tokens ``<resource>:read`` / ``<resource>:write`` with
resources profiles, segments, models, journeys, messages, templates, loyalty — or ``*`` for all.

>>> scope_allows(frozenset({"profiles:read"}), "profiles:read")
True
>>> scope_allows(frozenset({"profiles:read"}), "profiles:write")
False
>>> scope_allows(frozenset({"profiles:write"}), "profiles:read")
True
>>> scope_allows(frozenset({"*"}), "journeys:write")
True
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from cassandra.cluster import Session
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loyalist.cassandra import execute
from loyalist.http import ApiError
from loyalist.settings import Settings

CredentialKind = Literal["write_key", "api_token"]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(24)}"


def scope_allows(granted: frozenset[str], wanted: str) -> bool:
    if "*" in granted or wanted in granted:
        return True
    resource, _, action = wanted.partition(":")
    # write implies read on the same resource
    return action == "read" and f"{resource}:write" in granted


@dataclass(frozen=True, slots=True)
class Credential:
    kind: CredentialKind
    name: str
    source: str
    scopes: frozenset[str]


class CredentialStore:
    """Reads and writes the ``credentials`` table; caches positive and negative lookups briefly."""

    def __init__(self, session: Session, *, ttl_s: float = 30.0) -> None:
        self._session = session
        self._ttl = ttl_s
        self._cache: dict[str, tuple[float, Credential | None]] = {}
        self._select = session.prepare(
            "SELECT kind, name, source, scopes, revoked FROM credentials WHERE token_hash = ?"
        )
        self._insert = session.prepare(
            "INSERT INTO credentials (token_hash, kind, name, source, scopes, created_at, revoked) "
            "VALUES (?, ?, ?, ?, ?, toTimestamp(now()), false)"
        )

    async def lookup(self, token: str) -> Credential | None:
        key = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        rows = await execute(self._session, self._select, (key,))
        cred = None
        if rows and not rows[0]["revoked"]:
            r = rows[0]
            cred = Credential(r["kind"], r["name"], r["source"] or r["name"], frozenset(r["scopes"] or ()))
        self._cache[key] = (now + self._ttl, cred)
        return cred

    def create(self, token: str, kind: CredentialKind, name: str, *, source: str | None = None,
               scopes: set[str] | None = None) -> None:
        self._session.execute(
            self._insert, (hash_token(token), kind, name, source or name, scopes or set())
        )
        self._cache.pop(hash_token(token), None)

    def revoke(self, token: str) -> None:
        self._session.execute("UPDATE credentials SET revoked = true WHERE token_hash = %s", (hash_token(token),))
        self._cache.pop(hash_token(token), None)


def ensure_dev_credentials(settings: Settings, session: Session) -> None:
    """The documented development write key and API token. Only the local stack calls this."""
    store = CredentialStore(session)
    store.create(settings.dev_write_key, "write_key", "dev", source="web", scopes={"track"})
    store.create(settings.dev_api_token, "api_token", "dev", scopes={"*"})


def credential_store(request: Request) -> CredentialStore:
    store = getattr(request.app.state, "credentials", None)
    if store is None:
        raise ApiError(503, "not_ready", "credential store is not connected yet")
    return store  # type: ignore[no-any-return]


_bearer = HTTPBearer(auto_error=False)


async def authorize(request: Request, scheme: str | None, token: str | None, scope: str) -> Credential:
    """The API token of an ``Authorization: <scheme> <token>`` header, if it is a valid bearer token holding
    ``scope``; else the 401/403 to answer."""
    if scheme is None or scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing_token", "send 'Authorization: Bearer <api token>'")
    cred = await credential_store(request).lookup(token)
    if cred is None or cred.kind != "api_token":
        raise ApiError(401, "invalid_token", "the API token is unknown or revoked")
    if not scope_allows(cred.scopes, scope):
        raise ApiError(403, "insufficient_scope", f"this token lacks the '{scope}' scope")
    return cred


def require_scope(scope: str):  # type: ignore[no-untyped-def]
    """FastAPI dependency: a valid bearer API token holding ``scope``."""

    async def dependency(
        request: Request,
        creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> Credential:
        return await authorize(request, creds.scheme if creds else None, creds.credentials if creds else None,
                               scope)

    return dependency


def basic_auth_username(header: str | None) -> str | None:
    """The username of an HTTP Basic header (Segment puts the write key there, password empty).

    >>> basic_auth_username("Basic " + base64.b64encode(b"key123:").decode())
    'key123'
    >>> basic_auth_username("Bearer x") is None
    True
    """
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except Exception:
        return None
    username, _, _ = decoded.partition(":")
    return username or None
