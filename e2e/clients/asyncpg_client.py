"""asyncpg client of the rlsproxy end-to-end tests (e2e/asyncpg_test.go).

asyncpg speaks the protocol itself, without libpq, and reads the connection
from the PG* environment variables (PGPASSWORD is the token). Prints one
"check<TAB>value" line per result; rows print as
"user_id,content;user_id,content". A refused connection prints
"connect_error<TAB>SQLSTATE<TAB>message" and exits 3.

What matters to the proxy: asyncpg prepares every statement with Parse,
Describe and Flush, no Sync, and reads the answers before it sends the next
messages. When what follows is a plain Query (execute() without arguments,
BEGIN of transaction(), the COPY of copy_records_to_table, the pool's reset)
the server runs it inside the extended-query batch still open, as
PostgreSQL allows.
"""

import asyncio
import io
import sys

import asyncpg

NOTES = "SELECT user_id, content FROM notes WHERE id >= $1 ORDER BY id"
# The table e2e/asyncpg_test.go makes for the COPY FROM checks.
SCHEMA, ITEMS = "tools_asyncpg", "items"


def out(check, value):
    print("%s\t%s" % (check, value), flush=True)


def rows(rs):
    return ";".join("%s,%s" % (r[0], r[1]) for r in rs)


class Rollback(Exception):
    """Leaves a transaction() block by rolling it back: the demo notes are
    shared by every test."""


async def connect(**kwargs):
    return await asyncpg.connect(timeout=10, server_settings={"application_name": "rlsproxy-e2e-asyncpg"}, **kwargs)


async def main():
    try:
        conn = await connect()
    except (asyncpg.PostgresError, OSError) as e:
        out("connect_error", "%s\t%s" % (getattr(e, "sqlstate", "") or "", str(e).replace("\n", " ")))
        sys.exit(3)

    out("current_user", await conn.fetchval("SELECT current_user"))
    out("sub", await conn.fetchval("SELECT current_setting('jwt.claims.sub')"))

    # The prepared statements stay referenced: asyncpg closes a collected
    # one (Close, Sync) before its next message, which would put a Sync
    # between the Flush and the Query below.
    stmts = []

    # prepare(): Parse/Describe/Flush; fetch(): Bind/Execute/Sync.
    stmts.append(await conn.prepare(NOTES))
    out("prepare_fetch", rows(await stmts[-1].fetch(1)))

    # A plain Query right after the prepare's Flush, before any Sync.
    stmts.append(await conn.prepare(NOTES))
    await conn.execute("SELECT 1")
    out("prepare_execute", rows(await stmts[-1].fetch(1)))

    # transaction() sends BEGIN as a plain Query, here after a prepare.
    stmts.append(await conn.prepare(NOTES))
    async with conn.transaction():
        out("transaction", rows(await stmts[-1].fetch(1)))

    # copy_records_to_table prepares a query to learn the columns' types,
    # then sends COPY ... FROM STDIN as a plain Query. PostgreSQL refuses
    # COPY FROM into a table with RLS, so the copies go to a table of the
    # test's whose owner column defaults to the claim, and whose check
    # refuses rows of another owner.
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(ITEMS, schema_name=SCHEMA, records=[("asyncpg: copied",)],
                                             columns=["content"])
            out("copy_records", rows(await conn.fetch(
                "SELECT owner, content FROM tools_asyncpg.items WHERE content = 'asyncpg: copied'")))
            raise Rollback
    except Rollback:
        pass

    try:
        await conn.copy_records_to_table(ITEMS, schema_name=SCHEMA, records=[("someone-else", "forged")],
                                         columns=["owner", "content"])
        out("copy_denied", "none")
    except asyncpg.PostgresError as e:
        out("copy_denied", e.sqlstate)

    try:
        async with conn.transaction():
            await conn.copy_to_table(ITEMS, schema_name=SCHEMA, source=io.BytesIO(b"asyncpg: from file\n"),
                                     columns=["content"])
            out("copy_to_table", rows(await conn.fetch(
                "SELECT owner, content FROM tools_asyncpg.items WHERE content = 'asyncpg: from file'")))
            raise Rollback
    except Rollback:
        pass

    # With arguments, copy_from_query quotes them with a prepared statement
    # first, then sends COPY (...) TO STDOUT as a plain Query.
    buf = io.BytesIO()
    await conn.copy_from_query("SELECT user_id, content FROM notes WHERE id >= $1 ORDER BY id", 1, output=buf)
    out("copy_from_query", ";".join(line.replace("\t", ",") for line in buf.getvalue().decode().splitlines()))

    try:
        await conn.execute("INSERT INTO notes (user_id, content) VALUES ($1, $2)", "someone-else", "forged")
        out("insert_denied", "none")
    except asyncpg.PostgresError as e:
        out("insert_denied", e.sqlstate)
    await conn.close()

    # More workers than connections: a connection goes back to the pool
    # after a reset (RESET ALL among it) and serves the next worker, which
    # must still be this user.
    pool = await asyncpg.create_pool(min_size=1, max_size=3, timeout=10,
                                     server_settings={"application_name": "rlsproxy-e2e-asyncpg-pool"})

    async def worker():
        async with pool.acquire() as c:
            async with c.transaction():
                sub = await c.fetchval("SELECT current_setting('jwt.claims.sub')")
                notes = rows(await c.fetch(NOTES, 1))
            return sub, notes

    for sub, notes in await asyncio.gather(*(worker() for _ in range(8))):
        out("pool_sub", sub)
        out("pool", notes)
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
