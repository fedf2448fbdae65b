"""psycopg 3 client of the rlsproxy end-to-end tests (e2e/clients_test.go).

libpq reads the connection from the PG* environment variables (PGPASSWORD
is the token). Prints one "check<TAB>value" line per result; rows print as
"user_id,content;user_id,content". A refused connection prints
"connect_error<TAB>SQLSTATE<TAB>message" and exits 3.
"""

import sys
import threading

import psycopg

NOTES = "SELECT user_id, content FROM notes WHERE id >= %s ORDER BY id"


def out(check, value):
    print("%s\t%s" % (check, value), flush=True)


def rows(rs):
    return ";".join("%s,%s" % (user_id, content) for user_id, content in rs)


def main():
    try:
        conn = psycopg.connect("", application_name="rlsproxy-e2e-psycopg3", connect_timeout=10)
    except psycopg.OperationalError as e:
        out("connect_error", "%s\t%s" % (e.sqlstate or "", str(e).replace("\n", " ")))
        sys.exit(3)

    with conn:
        with conn.cursor() as cur:
            out("current_user", cur.execute("SELECT current_user").fetchone()[0])
            out("sub", cur.execute("SELECT current_setting('jwt.claims.sub')").fetchone()[0])
            # psycopg 3 binds parameters server side: Parse/Bind/Execute on
            # the unnamed statement.
            out("params", rows(cur.execute(NOTES, (1,)).fetchall()))
            # prepare=True makes a named statement (_pg3_N) on the first
            # run; the later runs only Bind it.
            for _ in range(6):
                out("prepared", rows(cur.execute(NOTES, (1,), prepare=True).fetchall()))
            out("server_prepared",
                cur.execute("SELECT (count(*) > 0)::text FROM pg_prepared_statements").fetchone()[0])
            # Results in binary format.
            out("binary", rows(cur.execute(NOTES, (1,), binary=True).fetchall()))

        # A server-side cursor: DECLARE ... CURSOR, then FETCH.
        with conn.cursor(name="notes_cursor") as cur:
            cur.itersize = 1
            cur.execute(NOTES, (1,))
            out("server_cursor", rows(cur))

        # Pipeline mode sends several Syncs before reading any result.
        with conn.pipeline():
            curs = [conn.cursor() for _ in range(3)]
            for cur in curs:
                cur.execute(NOTES, (1,))
        for cur in curs:
            out("pipeline", rows(cur.fetchall()))

        with conn.cursor() as cur:
            with cur.copy("COPY (SELECT user_id, content FROM notes ORDER BY id) TO STDOUT") as copy:
                out("copy", rows(copy.rows()))

            # The policy's WITH CHECK refuses a row owned by someone else.
            try:
                cur.execute("INSERT INTO notes (user_id, content) VALUES ('someone-else', 'forged')")
                out("insert_denied", "none")
            except psycopg.Error as e:
                out("insert_denied", e.sqlstate)
        conn.rollback()

        # conn.cancel() sends a CancelRequest on a new connection to the proxy.
        conn.autocommit = True
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        with conn.cursor() as cur:
            try:
                cur.execute("SELECT pg_sleep(5)")
                out("cancel", "none")
            except psycopg.Error as e:
                out("cancel", e.sqlstate)
            timer.join()
            out("after_cancel", rows(cur.execute(NOTES, (1,)).fetchall()))


if __name__ == "__main__":
    main()
