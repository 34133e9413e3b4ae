"""Real servers for integration and e2e tests, started once per test session.

MSGCORE_MONGO_URL / MSGCORE_PG_URL name existing servers; otherwise the embedded ones (SecantusDB
and pgserver's PostgreSQL) are started in a temporary directory. Each test gets its own MongoDB
database and its own PostgreSQL schema, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from ops.embedded import EmbeddedMongo, EmbeddedPostgres


@pytest.fixture(scope="session")
def server_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    mongo_url = os.environ.get("MSGCORE_MONGO_URL", "")
    pg_url = os.environ.get("MSGCORE_PG_URL", "")
    started: list[EmbeddedMongo | EmbeddedPostgres] = []
    data_dir = Path(tmp_path_factory.mktemp("servers"))
    if not mongo_url:
        mongo = EmbeddedMongo(data_dir)
        mongo.start()
        started.append(mongo)
        mongo_url = mongo.url
    if not pg_url:
        pg = EmbeddedPostgres(data_dir)
        pg.start()
        started.append(pg)
        pg_url = pg.url
    yield {"mongo": mongo_url, "pg": pg_url, "data_dir": str(data_dir)}
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def mongo_url(server_urls: dict[str, str]) -> str:
    return server_urls["mongo"]


@pytest.fixture(scope="session")
def pg_url(server_urls: dict[str, str]) -> str:
    return server_urls["pg"]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mongo_client(mongo_url: str) -> AsyncIterator[AsyncMongoClient]:
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=True)
    yield client
    await client.close()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(loop_scope="session")
async def mongo_db(mongo_client: AsyncMongoClient) -> AsyncIterator[AsyncDatabase]:
    name = unique_name("t")
    yield mongo_client[name]
    await mongo_client.drop_database(name)


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[str]:
    name = unique_name("rep")
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
