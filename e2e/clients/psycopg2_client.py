"""psycopg2 client of the rlsproxy end-to-end tests (e2e/clients_test.go).

libpq reads the connection from the PG* environment variables (PGPASSWORD
is the token). Prints one "check<TAB>value" line per result; rows print as
"user_id,content;user_id,content". A refused connection prints
"connect_error<TAB>SQLSTATE<TAB>message" and exits 3.
"""

import io
import sys
import threading

import psycopg2
import psycopg2.extensions

NOTES = "SELECT user_id, content FROM notes WHERE id >= %s ORDER BY id"


def out(check, value):
    print("%s\t%s" % (check, value), flush=True)


def rows(rs):
    return ";".join("%s,%s" % (user_id, content) for user_id, content in rs)


def main():
    try:
        conn = psycopg2.connect("", application_name="rlsproxy-e2e-psycopg2", connect_timeout=10)
    except psycopg2.OperationalError as e:
        # libpq reports a refused startup as text; psycopg2 has no pgcode here.
        out("connect_error", "%s\t%s" % (e.pgcode or "", str(e).replace("\n", " ")))
        sys.exit(3)

    with conn:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user")
            out("current_user", cur.fetchone()[0])
            cur.execute("SELECT current_setting('jwt.claims.sub')")
            out("sub", cur.fetchone()[0])
            # psycopg2 interpolates parameters client side: a simple Query
            # inside the BEGIN it issued implicitly.
            cur.execute(NOTES, (1,))
            out("simple", rows(cur.fetchall()))

        # A named cursor is a server-side DECLARE ... CURSOR read with FETCH.
        with conn.cursor(name="notes_cursor") as cur:
            cur.itersize = 1
            cur.execute(NOTES, (1,))
            out("named_cursor", rows(cur))

        with conn.cursor() as cur:
            buf = io.StringIO()
            cur.copy_expert("COPY (SELECT user_id, content FROM notes ORDER BY id) TO STDOUT", buf)
            out("copy", rows(line.split("\t") for line in buf.getvalue().splitlines()))

            # The policy's WITH CHECK refuses a row owned by someone else.
            try:
                cur.execute("INSERT INTO notes (user_id, content) VALUES ('someone-else', 'forged')")
                out("insert_denied", "none")
            except psycopg2.Error as e:
                out("insert_denied", e.pgcode)
    conn.rollback()

    # conn.cancel() sends a CancelRequest on a new connection to the proxy.
    conn.autocommit = True
    timer = threading.Timer(0.3, conn.cancel)
    timer.start()
    with conn.cursor() as cur:
        try:
            cur.execute("SELECT pg_sleep(5)")
            out("cancel", "none")
        except psycopg2.Error as e:
            out("cancel", e.pgcode)
        timer.join()
        cur.execute(NOTES, (1,))
        out("after_cancel", rows(cur.fetchall()))
    conn.close()


if __name__ == "__main__":
    main()
