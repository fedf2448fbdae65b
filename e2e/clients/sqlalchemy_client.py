"""SQLAlchemy (psycopg2 dialect) client of the rlsproxy end-to-end tests
(e2e/clients_test.go).

Builds its URL from the PG* environment variables (PGPASSWORD is the
token). Prints one "check<TAB>value" line per result; rows print as
"user_id,content;user_id,content". A refused connection prints
"connect_error<TAB>SQLSTATE<TAB>message" and exits 3.
"""

import os
import sys

import sqlalchemy
from sqlalchemy import Column, Integer, Text, bindparam, select, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, declarative_base

Base = declarative_base()


class Note(Base):
    __tablename__ = "notes"
    id = Column(Integer, primary_key=True)
    user_id = Column(Text, nullable=False)
    content = Column(Text, nullable=False)


def out(check, value):
    print("%s\t%s" % (check, value), flush=True)


def rows(notes):
    return ";".join("%s,%s" % (n.user_id, n.content) for n in notes)


def main():
    url = URL.create(
        "postgresql+psycopg2",
        username=os.environ["PGUSER"],
        password=os.environ["PGPASSWORD"],
        host=os.environ["PGHOST"],
        port=int(os.environ["PGPORT"]),
        database=os.environ["PGDATABASE"],
        query={"sslmode": os.environ.get("PGSSLMODE", "disable"), "application_name": "rlsproxy-e2e-sqlalchemy"},
    )
    # pool_pre_ping pings a pooled connection before handing it out, as
    # applications configure it: one more round trip through the proxy.
    engine = sqlalchemy.create_engine(url, future=True, pool_pre_ping=True)
    try:
        # The dialect's first connect runs its own probes (version,
        # current_schema, standard_conforming_strings) through the proxy.
        session = Session(engine, future=True)
        out("current_user", session.execute(text("SELECT current_user")).scalar_one())
    except sqlalchemy.exc.OperationalError as e:
        out("connect_error", "%s\t%s" % (getattr(e.orig, "pgcode", None) or "", str(e.orig).replace("\n", " ")))
        sys.exit(3)

    with session:
        out("sub", session.execute(text("SELECT current_setting('jwt.claims.sub')")).scalar_one())
        out("orm", rows(session.execute(select(Note).order_by(Note.id)).scalars()))
        stmt = select(Note).where(Note.id >= bindparam("min_id")).order_by(Note.id)
        out("orm_filter", rows(session.execute(stmt, {"min_id": 1}).scalars()))
        # The ORM's flush hits the policy's WITH CHECK.
        session.add(Note(user_id="someone-else", content="forged"))
        try:
            session.flush()
            out("insert_denied", "none")
        except sqlalchemy.exc.DBAPIError as e:
            out("insert_denied", e.orig.pgcode)
        session.rollback()
    engine.dispose()


if __name__ == "__main__":
    main()
