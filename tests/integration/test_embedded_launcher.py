"""The embedded server's launcher patches (ops/secantus_launcher.py) keep what they shortcut correct:
profiling settings still take effect at once, and an abandoned transaction is still reaped."""

from __future__ import annotations

import asyncio
import os

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from ops.secantus_launcher import PRUNE_EVERY_S, TRANSACTION_LIFETIME_S

pytestmark = pytest.mark.skipif(bool(os.environ.get("MSGCORE_MONGO_URL")),
                                reason="the launcher's patches only apply to the embedded server")


async def test_profiling_level_changes_take_effect_at_once(mongo_db: AsyncDatabase) -> None:
    await mongo_db["c"].insert_one({"_id": 1})
    await mongo_db["c"].find_one({"_id": 1})  # read (and keep) the default settings first
    assert (await mongo_db.command("profile", -1))["was"] == 0
    await mongo_db.command("profile", 2)
    assert (await mongo_db.command("profile", -1))["was"] == 2
    await mongo_db["c"].find_one({"_id": 1}, comment="profiled")
    assert await mongo_db["system.profile"].count_documents({"command.comment": "profiled"}) == 1
    await mongo_db.command("profile", 0)
    await mongo_db["c"].find_one({"_id": 1}, comment="not profiled")
    assert await mongo_db["system.profile"].count_documents({"command.comment": "not profiled"}) == 0


async def test_an_abandoned_transaction_is_still_reaped(mongo_client: AsyncMongoClient,
                                                        mongo_db: AsyncDatabase) -> None:
    """A transaction left open (its client died mid-commit) holds its writes until reaped; another
    writer of the same document gets through once the lifetime has passed."""
    await mongo_db["c"].insert_one({"_id": "doc", "n": 0})
    abandoned = mongo_client.start_session()
    await abandoned.start_transaction()
    await mongo_db["c"].update_one({"_id": "doc"}, {"$inc": {"n": 1}}, session=abandoned)
    # never committed nor aborted: the session is simply dropped
    deadline = asyncio.get_running_loop().time() + TRANSACTION_LIFETIME_S + PRUNE_EVERY_S + 20
    while True:
        try:
            async with mongo_client.start_session() as s:
                await s.with_transaction(lambda s: mongo_db["c"].update_one({"_id": "doc"}, {"$inc": {"n": 10}},
                                                                           session=s))
            break
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
    assert (await mongo_db["c"].find_one({"_id": "doc"}))["n"] == 10
    await abandoned.end_session()
