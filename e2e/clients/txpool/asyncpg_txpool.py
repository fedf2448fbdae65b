"""asyncpg client of the transaction-pooling e2e test (e2e/txpool_clients_test.go).

TXPOOL_CONNS connections, one task each, run TXPOOL_TXS transactions that
re-execute the same statements: WHO prepared with prepare() (a named
statement, __asyncpg_stmt_N__), NOTES through fetch() and asyncpg's
statement cache (named too). Every tenth transaction drops WHO's
PreparedStatement and prepares the query again: asyncpg parses a new
statement, then closes the old one (Close, Sync). Prints one line per
transaction: "tx<TAB>conn<TAB>i<TAB>kind<TAB>who<TAB>rows<TAB>pids" (see the
Go test). asyncpg reads the connection from the PG* environment variables
(PGPASSWORD is the token).
"""

import asyncio
import os
import sys

import asyncpg

WHO = "SELECT current_user::text, current_setting('jwt.claims.sub'), $1::int * 2, pg_backend_pid()"
NOTES = "SELECT user_id, content FROM notes WHERE id >= $1 ORDER BY id"


def out(*fields):
    print("\t".join(str(f) for f in fields), flush=True)


async def client(c, txs):
    conn = await asyncpg.connect(timeout=10, server_settings={"application_name": "rlsproxy-e2e-txpool-asyncpg"})
    try:
        who_stmt = await conn.prepare(WHO)

        async def who(i):
            r = await who_stmt.fetchrow(i)
            return "%s,%s,%s" % (r[0], r[1], r[2]), r[3]

        async def notes():
            return ";".join("%s,%s" % (r[0], r[1]) for r in await conn.fetch(NOTES, 1))

        for i in range(txs):
            if i % 10 == 9:
                kind = "redo"
                # The old statement, unreferenced, is closed on the server
                # once the new one is prepared.
                who_stmt = None
                who_stmt = await conn.prepare(WHO)
                w, pid = await who(i)
                rows = await notes()
                pids = [pid]
            elif i % 3 == 2:
                kind = "block"
                async with conn.transaction():
                    w, pid = await who(i)
                    rows = await notes()
                    w2, pid2 = await who(i)
                pids = [pid, pid2]
                if w2 != w:
                    w += "|" + w2
            else:
                kind = "auto"
                w, pid = await who(i)
                rows = await notes()
                pids = [pid]
            out("tx", c, i, kind, w, rows, ",".join(str(p) for p in pids))
    finally:
        await conn.close()


async def main():
    conns = int(os.environ["TXPOOL_CONNS"])
    txs = int(os.environ["TXPOOL_TXS"])
    results = await asyncio.gather(*(client(c, txs) for c in range(conns)), return_exceptions=True)
    failed = False
    for c, r in enumerate(results):
        if isinstance(r, BaseException):
            print("conn %d: %r" % (c, r), file=sys.stderr, flush=True)
            failed = True
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
