"""The API's one-round-trip Redis lookup against a real Redis: identifier -> profile id -> document, following
merge redirects, and what it answers when Redis does not hold the document or the identifier."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from loyalist.redis import make_redis
from loyalist.settings import Settings
from services.profile.store import HotProfiles

pytestmark = pytest.mark.integration


def test_resolve_follows_identifiers_and_merge_redirects(stack_settings: Settings) -> None:
    async def scenario() -> None:
        redis = make_redis(stack_settings)
        hot = HotProfiles(redis, stack_settings)
        try:
            survivor_doc = {"profile_id": "p-survivor", "traits": {"email": "a@example.com"}}
            # p-old was merged into p-mid, which was merged into p-survivor; only the survivor has a document.
            await hot.write({"p-survivor": survivor_doc},
                            {("user_id", "u-1"): "p-old", ("profile_id", "p-old"): "p-mid",
                             ("profile_id", "p-mid"): "p-survivor", ("user_id", "u-cold"): "p-cold"})
            pid, raw = await hot.resolve(ident=("user_id", "u-1"))
            assert (pid, orjson.loads(raw or b"null")) == ("p-survivor", survivor_doc)
            pid, raw = await hot.resolve(profile_id="p-mid")
            assert (pid, orjson.loads(raw or b"null")) == ("p-survivor", survivor_doc)
            # Known identifier, document not in Redis: the id, so the caller asks Cassandra.
            assert await hot.resolve(ident=("user_id", "u-cold")) == ("p-cold", None)
            assert await hot.resolve(ident=("user_id", "nobody")) == (None, None)
            # A redirect chain longer than allowed stops where it got to.
            assert await hot.resolve(profile_id="p-old", max_redirects=1) == ("p-mid", None)
        finally:
            await hot.write({}, {}, deleted=["p-survivor"],
                            deleted_idents=[("user_id", "u-1"), ("profile_id", "p-old"), ("profile_id", "p-mid"),
                                            ("user_id", "u-cold")])
            await redis.aclose()

    asyncio.run(scenario())
