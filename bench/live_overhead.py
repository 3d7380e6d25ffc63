"""Live maintenance overhead: one ORM flush of 1,000 children over 100 parents, with vs without.

Run by hand (PostgreSQL must be up):

    .venv/bin/python bench/live_overhead.py [--url URL] [--rounds 30]
    .venv/bin/python bench/live_overhead.py --url mysql+pymysql://root@127.0.0.1:3306/  # MariaDB

(On MariaDB each side gets a database of its own instead of a schema.)

Two cases, each measured on a counted schema and on the same schema without
counters: 1,000 mapped ``follows`` rows added, and 1,000 links appended to
``relationship(secondary=links)`` collections (a plain association table,
both of its FKs counted). Both schemas live side by side in one database and
are measured interleaved in the same run, so machine noise hits both alike.
Prints the median flush time of each and their ratio (goal: at most 1.3), and
the median CPU time this process spent in each flush (``time.thread_time``):
the Python work the counters add, which machine load disturbs less than the
wall-clock ratio (the rest of the difference is round trips and server time).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

import alembic_counterfill
from alembic_counterfill import counter_cache

PARENTS, CHILDREN = 100, 1000


class Counted(DeclarativeBase):
    pass


def _links(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "links",
        metadata,
        sa.Column("follower_id", sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("followed_id", sa.ForeignKey("users.id"), primary_key=True, index=True),
    )


c_links = _links(Counted.metadata)


class CUser(Counted):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    followers_count: Mapped[int] = counter_cache("CFollow.followed_id")
    fans_count: Mapped[int] = counter_cache("links.followed_id")
    idols_count: Mapped[int] = counter_cache("links.follower_id")
    following: Mapped[list[CUser]] = relationship(
        secondary=c_links,
        primaryjoin=lambda: c_links.c.follower_id == CUser.id,
        secondaryjoin=lambda: c_links.c.followed_id == CUser.id,
    )


class CFollow(Counted):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)


class Plain(DeclarativeBase):
    pass


p_links = _links(Plain.metadata)


class PUser(Plain):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    followers_count: Mapped[int] = mapped_column(default=0, server_default="0")
    fans_count: Mapped[int] = mapped_column(default=0, server_default="0")
    idols_count: Mapped[int] = mapped_column(default=0, server_default="0")
    following: Mapped[list[PUser]] = relationship(
        secondary=p_links,
        primaryjoin=lambda: p_links.c.follower_id == PUser.id,
        secondaryjoin=lambda: p_links.c.followed_id == PUser.id,
    )


class PFollow(Plain):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)


def is_mysql(url: str) -> bool:
    return sa.make_url(url).get_backend_name() in ("mysql", "mariadb")


def engine_for(url: str, schema: str) -> sa.Engine:
    if is_mysql(url):
        return sa.create_engine(sa.make_url(url).set(database=schema))
    return sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})


def setup(
    admin: sa.Engine, url: str, schema: str, base: type[DeclarativeBase], user: type
) -> sa.Engine:
    with admin.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema))
    engine = engine_for(url, schema)
    base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([user(id=i) for i in range(1, PARENTS + 1)])
        s.commit()
    return engine


def _timed_flush(s: Session) -> tuple[float, float]:
    """Flush ``s``; return its wall-clock and CPU (this thread) seconds."""
    start, cpu = time.perf_counter(), time.thread_time()
    s.flush()
    return time.perf_counter() - start, time.thread_time() - cpu


def one_flush(engine: sa.Engine, follow: type, round_no: int) -> tuple[float, float]:
    with Session(engine) as s:
        rows = [
            follow(follower_id=1 + (i * 7 + round_no) % PARENTS, followed_id=1 + i % PARENTS)
            for i in range(CHILDREN)
        ]
        s.add_all(rows)
        elapsed = _timed_flush(s)
        s.commit()
    return elapsed


def one_link_flush(
    engine: sa.Engine, user: Any, links: sa.Table, round_no: int
) -> tuple[float, float]:
    """Append 1,000 distinct links across the 100 users' collections; time the flush."""
    with Session(engine) as s:
        s.execute(sa.delete(links))  # through the session: the counted schema stays exact
        s.commit()
        users = {u.id: u for u in s.scalars(sa.select(user).options(selectinload(user.following)))}
        for i in range(CHILDREN):
            a, k = 1 + i % PARENTS, i // PARENTS  # ten links per user, ten distinct targets
            users[a].following.append(users[1 + (a + 1 + 9 * k + round_no) % PARENTS])
        elapsed = _timed_flush(s)
        s.commit()
    return elapsed


def _report(
    what: str, rounds: int, with_c: list[tuple[float, float]], without: list[tuple[float, float]]
) -> None:
    a, b = statistics.median(w for w, _ in with_c), statistics.median(w for w, _ in without)
    ca, cb = statistics.median(c for _, c in with_c), statistics.median(c for _, c in without)
    print(f"{what}, median of {rounds}:")
    print(f"  without counters: {b * 1000:8.2f} ms")
    print(f"  with counters:    {a * 1000:8.2f} ms")
    print(f"  ratio with/without: {a / b:.2f} (goal <= 1.30)")
    print(f"  CPU in the flush: {cb * 1000:.2f} / {ca * 1000:.2f} ms (+{(ca - cb) * 1000:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    # Before/after comparisons run this script with another checkout's interpreter.
    print(f"library: {alembic_counterfill.__file__}")
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    tag = uuid.uuid4().hex[:8]
    schemas = [f"bench_live_c_{tag}", f"bench_live_p_{tag}"]
    counted = setup(admin, args.url, schemas[0], Counted, CUser)
    plain = setup(admin, args.url, schemas[1], Plain, PUser)
    try:
        for warm in range(3):  # statement caches, connection pool
            one_flush(counted, CFollow, -1 - warm)
            one_flush(plain, PFollow, -1 - warm)
            one_link_flush(counted, CUser, c_links, -1 - warm)
            one_link_flush(plain, PUser, p_links, -1 - warm)
        with_c, without, links_c, links_p = [], [], [], []  # type: ignore[var-annotated]
        for r in range(args.rounds):
            # Alternate which goes first so drift in machine load cancels out.
            pair = [(counted, CFollow, with_c), (plain, PFollow, without)]
            for engine, follow, out in pair if r % 2 == 0 else pair[::-1]:
                out.append(one_flush(engine, follow, r))
            link_pair = [(counted, CUser, c_links, links_c), (plain, PUser, p_links, links_p)]
            for engine, user, links, out in link_pair if r % 2 == 0 else link_pair[::-1]:
                out.append(one_link_flush(engine, user, links, r))
        with counted.connect() as conn:
            cached = conn.scalar(sa.text("SELECT sum(followers_count) FROM users"))
            actual = conn.scalar(sa.text("SELECT count(*) FROM follows"))
            assert cached == actual, (cached, actual)
            for column, fk in (("fans_count", "followed_id"), ("idols_count", "follower_id")):
                wrong = conn.scalar(
                    sa.text(
                        f"SELECT count(*) FROM users u WHERE {column} <> "  # noqa: S608 - constants
                        f"(SELECT count(*) FROM links l WHERE l.{fk} = u.id)"
                    )
                )
                assert wrong == 0, (column, wrong)
        children = f"flush of {CHILDREN} children over {PARENTS} parents"
        _report(children, args.rounds, with_c, without)
        _report(
            f"flush appending {CHILDREN} association-table links across {PARENTS} people",
            args.rounds,
            links_c,
            links_p,
        )
    finally:
        counted.dispose()
        plain.dispose()
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(sa.schema.DropSchema(schema, cascade=not is_mysql(args.url)))
        admin.dispose()


if __name__ == "__main__":
    main()
