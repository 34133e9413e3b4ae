"""A read-only PostgreSQL role for BI tools: it can read the reporting schema and nothing else.

`ensure_bi_role` is idempotent (run it as often as you like, e.g. after every deploy or rebuild):

- creates the role if missing: NOLOGIN, or LOGIN with a password when one is given (a password
  given for an existing role sets it and enables LOGIN); never SUPERUSER, CREATEDB, CREATEROLE,
  REPLICATION or BYPASSRLS; an existing role with any of these, or that is a member of another
  role (whose privileges it could use), is refused rather than silently widened;
- grants USAGE on the reporting schema and SELECT on every table and view in it, and default
  privileges so that tables and views later migrations create are readable too;
- revokes everything else granted to the role directly: other privileges in the reporting schema,
  privileges on other schemas and their tables, views, sequences and functions, CREATE/TEMP on the
  database; and CREATE on schema `public` from PUBLIC if the server still grants it (PostgreSQL
  < 15 did by default; on 15+ this changes nothing);
- sets `default_transaction_read_only = on` for the role's own sessions.

What every role can do whatever is granted (PostgreSQL built-ins): read the system catalogs
(`pg_catalog`, `information_schema`; psql and BI tools need them) and create temporary tables if
the database grants TEMP to PUBLIC (the default). Neither reaches msgcore's data.

A schema rebuilt and swapped in under the same name is a new schema: run `ensure_bi_role` again
after the swap so the role can read it (it also drops the role's grants on the old one).
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from projections.schema import lock_key, migrate

log = logging.getLogger(__name__)

DEFAULT_ROLE = "msgcore_bi"
_UNSAFE_ATTRIBUTES = ("rolsuper", "rolcreatedb", "rolcreaterole", "rolreplication", "rolbypassrls")


class BiRoleError(RuntimeError):
    """The role exists but is not fit to be a read-only BI role (it is privileged)."""


async def ensure_bi_role(pg_url: str, schema: str, role: str = DEFAULT_ROLE, password: str | None = None) -> None:
    """Create or repair `role` so that it can SELECT from `schema` (migrated first) and do nothing else.

    Needs a connection that may create roles and owns `schema` (the projector's, or a superuser's).
    Raises BiRoleError when an existing role of that name is privileged.
    """
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await migrate(conn, schema)
        async with conn.transaction():
            # Roles are cluster-wide: serialise concurrent callers for the same role.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("bi_role", role),))
            await _create_or_check(conn, role, password)
            await _revoke_elsewhere(conn, schema, role)
            await _grant_reporting(conn, schema, role)
    log.info("schema %s: read-only role %s ready", schema, role)


async def drop_bi_role(pg_url: str, role: str = DEFAULT_ROLE) -> bool:
    """Drop `role` and its privileges (in the database of `pg_url`); False if there was no such role.

    The role must hold no privileges in other databases of the cluster.
    """
    r = sql.Identifier(role)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn, conn.transaction():
        cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        if await cur.fetchone() is None:
            return False
        await conn.execute(sql.SQL("DROP OWNED BY {}").format(r))
        await conn.execute(sql.SQL("DROP ROLE {}").format(r))
    return True


async def _create_or_check(conn: psycopg.AsyncConnection, role: str, password: str | None) -> None:
    r = sql.Identifier(role)
    cur = await conn.execute(
        sql.SQL("SELECT {} FROM pg_roles WHERE rolname = %s").format(
            sql.SQL(", ").join(sql.Identifier(a) for a in _UNSAFE_ATTRIBUTES)
        ),
        (role,),
    )
    row = await cur.fetchone()
    login = sql.SQL("LOGIN PASSWORD {}").format(sql.Literal(password)) if password else sql.SQL("NOLOGIN")
    if row is None:
        await conn.execute(
            sql.SQL("CREATE ROLE {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS {}").format(r, login)
        )
        log.info("created role %s", role)
    else:
        unsafe = [a.removeprefix("rol") for a, on in zip(_UNSAFE_ATTRIBUTES, row, strict=True) if on]
        if unsafe:
            raise BiRoleError(f"role {role!r} exists with {', '.join(unsafe)}: it cannot be a read-only BI role")
        if password:
            await conn.execute(sql.SQL("ALTER ROLE {} {}").format(r, login))
    cur = await conn.execute(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
        " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s ORDER BY 1",
        (role,),
    )
    groups = [g for (g,) in await cur.fetchall()]
    if groups:
        raise BiRoleError(
            f"role {role!r} is a member of {', '.join(groups)}: it would have their privileges; revoke the "
            "membership or choose another role name"
        )
    await conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(r))


async def _revoke_elsewhere(conn: psycopg.AsyncConnection, schema: str, role: str) -> None:
    """Revoke what `role` was granted directly outside `schema` (and on the database itself)."""
    r = sql.Identifier(role)
    cur = await conn.execute(
        "SELECT n.nspname FROM pg_namespace n, aclexplode(n.nspacl) a"
        " WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = %s) AND n.nspname <> %s",
        (role, schema),
    )
    for (other,) in sorted(set(await cur.fetchall())):
        o = sql.Identifier(other)
        for kind in ("SCHEMA", "ALL TABLES IN SCHEMA", "ALL SEQUENCES IN SCHEMA", "ALL FUNCTIONS IN SCHEMA"):
            await conn.execute(sql.SQL("REVOKE ALL ON {} {} FROM {}").format(sql.SQL(kind), o, r))
        log.info("role %s: revoked its privileges on schema %s", role, other)
    # Tables/views granted to the role in schemas it has no grant on (reachable via PUBLIC's USAGE
    # on `public`, for example).
    cur = await conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,"
        " aclexplode(c.relacl) a"
        " WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = %s) AND n.nspname <> %s",
        (role, schema),
    )
    for nsp, rel in sorted(set(await cur.fetchall())):
        await conn.execute(sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(sql.Identifier(nsp, rel), r))
    cur = await conn.execute("SELECT current_database()")
    row = await cur.fetchone()
    assert row is not None
    await conn.execute(sql.SQL("REVOKE CREATE, TEMPORARY ON DATABASE {} FROM {}").format(sql.Identifier(row[0]), r))
    cur = await conn.execute(
        "SELECT has_schema_privilege(%s, 'public', 'CREATE') FROM pg_namespace WHERE nspname = 'public'", (role,)
    )
    row = await cur.fetchone()
    if row is not None and row[0]:
        await conn.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(r))
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        log.warning("revoked CREATE on schema public from PUBLIC (the pre-PostgreSQL-15 default granted it)")


async def _grant_reporting(conn: psycopg.AsyncConnection, schema: str, role: str) -> None:
    s, r = sql.Identifier(schema), sql.Identifier(role)
    for kind in ("SCHEMA", "ALL TABLES IN SCHEMA", "ALL SEQUENCES IN SCHEMA", "ALL FUNCTIONS IN SCHEMA"):
        await conn.execute(sql.SQL("REVOKE ALL ON {} {} FROM {}").format(sql.SQL(kind), s, r))
    await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r))
    await conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r))
    # Future tables and views: those the migrator creates. The migrator is whoever owns the schema
    # (migrate() creates it) and, if different, this session's user.
    cur = await conn.execute(
        "SELECT DISTINCT u FROM (SELECT pg_get_userbyid(nspowner) AS u FROM pg_namespace WHERE nspname = %s"
        " UNION ALL SELECT current_user::text) x WHERE pg_has_role(current_user, u, 'MEMBER') ORDER BY 1",
        (schema,),
    )
    for (owner,) in await cur.fetchall():
        await conn.execute(
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
                sql.Identifier(owner), s, r
            )
        )
