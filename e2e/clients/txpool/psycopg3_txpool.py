"""psycopg 3 client of the transaction-pooling e2e test (e2e/txpool_clients_test.go).

TXPOOL_CONNS connections, one thread each, run the same two statements with
prepare=True (named server-side statements, _pg3_N, Parse once and Bind
after) in TXPOOL_TXS transactions each. Prints one line per transaction:
"tx<TAB>conn<TAB>i<TAB>kind<TAB>who<TAB>rows<TAB>pids" (see the Go test).

The mode, the first argument:
  commit    every transaction commits;
  rollback  every tenth transaction rolls back, after which psycopg 3.1
            deallocates every statement (DEALLOCATE ALL, sent through the
            extended protocol: Parse/Bind/Execute) and prepares them again;
  evict     prepared_max = 1: each statement evicts the other, which psycopg
            deallocates (DEALLOCATE _pg3_N, through the extended protocol).
"""

import os
import sys
import threading

import psycopg

WHO = "SELECT current_user::text, current_setting('jwt.claims.sub'), %s::int * 2, pg_backend_pid()"
NOTES = "SELECT user_id, content FROM notes WHERE id >= %s ORDER BY id"

lock = threading.Lock()


def out(*fields):
    with lock:
        print("\t".join(str(f) for f in fields), flush=True)


def main():
    mode = sys.argv[1]
    conns = int(os.environ["TXPOOL_CONNS"])
    txs = int(os.environ["TXPOOL_TXS"])
    errors = []

    def run(c):
        try:
            with psycopg.connect("", application_name="rlsproxy-e2e-txpool-psycopg3", connect_timeout=10) as conn:
                conn.autocommit = True
                if mode == "evict":
                    conn.prepared_max = 1
                cur = conn.cursor()

                def who(i):
                    u, s, d, pid = cur.execute(WHO, (i,), prepare=True).fetchone()
                    return "%s,%s,%s" % (u, s, d), pid

                def notes():
                    return ";".join("%s,%s" % r for r in cur.execute(NOTES, (1,), prepare=True).fetchall())

                for i in range(txs):
                    if mode == "rollback" and i % 10 == 9:
                        # A transaction rolled back: psycopg forgets its
                        # prepared statements and sends DEALLOCATE ALL
                        # before its next query, then prepares them again
                        # under new names.
                        kind = "redo"
                        conn.autocommit = False
                        w, pid = who(i)
                        rows = notes()
                        w2, pid2 = who(i)
                        conn.rollback()
                        conn.autocommit = True
                    elif i % 3 == 2:
                        # BEGIN ... COMMIT around three executions: one
                        # backend throughout.
                        kind = "block"
                        with conn.transaction():
                            w, pid = who(i)
                            rows = notes()
                            w2, pid2 = who(i)
                    else:
                        # Each execution its own transaction, each free to
                        # land on another backend.
                        kind = "auto"
                        w, pid = who(i)
                        rows = notes()
                        w2, pid2 = w, pid
                    pids = [pid] if kind == "auto" else [pid, pid2]
                    if w2 != w:
                        w += "|" + w2
                    out("tx", c, i, kind, w, rows, ",".join(str(p) for p in pids))
        except Exception as e:  # reported, and the exit status says so
            errors.append(e)
            print("conn %d: %r" % (c, e), file=sys.stderr, flush=True)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
