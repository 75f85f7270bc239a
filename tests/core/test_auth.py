"""Write keys and scoped API tokens, stored hashed in the real Cassandra."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from fastapi import Depends

from loyalist.auth import Credential, CredentialStore, hash_token, require_scope
from loyalist.cassandra import connect
from loyalist.devstack import REPO
from loyalist.http import create_service_app
from loyalist.settings import Settings
from tests.conftest import settings_env

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str) -> str:
    env = {**os.environ, **settings_env(settings)}
    out = subprocess.run([sys.executable, "-m", "loyalist.cli", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def test_tokens_are_hashed_scoped_and_revocable(stack_settings: Settings) -> None:
    token = cli(stack_settings, "credentials", "create", "--kind", "api_token", "--name", "ci",
                "--scopes", "profiles:read")
    assert token.startswith("lt_")
    cluster, session = connect(stack_settings, keyspace=stack_settings.keyspace)
    try:
        stored = session.execute("SELECT token_hash FROM credentials").all()
        hashes = {r["token_hash"] for r in stored}
        assert hash_token(token) in hashes and token not in hashes

        app = create_service_app("authtest", title="t", description="t")
        app.state.credentials = CredentialStore(session)
        app.state.started = True

        @app.get("/read")
        async def read(cred: Credential = Depends(require_scope("profiles:read"))) -> dict[str, str]:
            return {"name": cred.name}

        @app.post("/write")
        async def write(cred: Credential = Depends(require_scope("profiles:write"))) -> dict[str, str]:
            return {"name": cred.name}

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            missing = await client.get("/read")
            assert missing.status_code == 401 and missing.json()["code"] == "missing_token"
            wrong = await client.get("/read", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_token"
            ok = await client.get("/read", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json() == {"name": "ci"}
            denied = await client.post("/write", headers={"Authorization": f"Bearer {token}"})
            assert denied.status_code == 403 and denied.json()["code"] == "insufficient_scope"
            # A write key is not an API token, even with a valid hash.
            wk = await client.get("/read", headers={"Authorization": f"Bearer {stack_settings.dev_write_key}"})
            assert wk.status_code == 401

            cli(stack_settings, "credentials", "revoke", token)
            app.state.credentials = CredentialStore(session)  # a fresh process has no cached answer
            revoked = await client.get("/read", headers={"Authorization": f"Bearer {token}"})
            assert revoked.status_code == 401
    finally:
        cluster.shutdown()


def test_cli_migrate_and_topics_are_idempotent(stack_settings: Settings) -> None:
    assert "up to date" in cli(stack_settings, "migrate")
    listing = cli(stack_settings, "topics")
    assert f"{stack_settings.namespace}.events.raw" in listing and "created" not in listing
