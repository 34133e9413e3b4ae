"""Reporting schema migrations: numbered SQL files in `projections/migrations/`, applied once each.

A migration file is DDL with `{schema}` where the schema name goes (literal braces doubled: `{{}}`);
the name is substituted as a quoted identifier, never pasted as text.
"""

from __future__ import annotations

import hashlib
import logging
from importlib import resources

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

_MIGRATIONS_PACKAGE = "projections.migrations"


def lock_key(*parts: str) -> int:
    """A stable signed 64-bit key for `pg_advisory_lock`, derived from `parts`.

    Python's `hash()` is salted per process, so two processes would disagree; blake2b does not.
    """
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def available_migrations() -> list[tuple[str, str]]:
    """(version, sql text) of every migration file, in version order (`0001_x.sql` -> `0001_x`)."""
    files = [f for f in resources.files(_MIGRATIONS_PACKAGE).iterdir() if f.name.endswith(".sql")]
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in sorted(files, key=lambda f: f.name)]


async def migrate(conn_or_url: psycopg.AsyncConnection | str, schema: str) -> list[str]:
    """Apply the pending migrations to `schema` (created if missing); return the versions applied.

    Each migration runs in its own transaction together with its row in `{schema}.migrations`, so
    it is applied entirely or not at all. Concurrent callers on the same schema are serialised by an
    advisory transaction lock and re-check what is applied under it: each version runs exactly once.
    A connection passed in must not be inside a transaction; it is left open.
    """
    if isinstance(conn_or_url, str):
        async with await psycopg.AsyncConnection.connect(conn_or_url, autocommit=True) as conn:
            return await _migrate(conn, schema)
    return await _migrate(conn_or_url, schema)


async def _migrate(conn: psycopg.AsyncConnection, schema: str) -> list[str]:
    ident = sql.Identifier(schema)
    key = lock_key("migrate", schema)
    applied: list[str] = []
    for version, text in available_migrations():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.migrations"
                    " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(ident)
            )
            cur = await conn.execute(
                sql.SQL("SELECT 1 FROM {}.migrations WHERE version = %s").format(ident), (version,)
            )
            if await cur.fetchone() is not None:
                continue
            await conn.execute(sql.SQL(text).format(schema=ident))
            await conn.execute(sql.SQL("INSERT INTO {}.migrations (version) VALUES (%s)").format(ident), (version,))
            applied.append(version)
            log.info("schema %s: applied migration %s", schema, version)
    return applied
