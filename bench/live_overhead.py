"""Live maintenance overhead: one ORM flush of 1,000 children over 100 parents, with vs without.

Run by hand (PostgreSQL must be up):

    .venv/bin/python bench/live_overhead.py [--url URL] [--rounds 30]
    .venv/bin/python bench/live_overhead.py --url mysql+pymysql://root@127.0.0.1:3306/  # MariaDB

(On MariaDB each side gets a database of its own instead of a schema.)

Both schemas live side by side in one database and are measured interleaved in
the same run, so machine noise hits both alike. Prints the median flush time of
each and their ratio (goal: at most 1.3).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alembic_counterfill import counter_cache

PARENTS, CHILDREN = 100, 1000


class Counted(DeclarativeBase):
    pass


class CUser(Counted):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    followers_count: Mapped[int] = counter_cache("CFollow.followed_id")


class CFollow(Counted):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)


class Plain(DeclarativeBase):
    pass


class PUser(Plain):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    followers_count: Mapped[int] = mapped_column(default=0, server_default="0")


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


def one_flush(engine: sa.Engine, follow: type, round_no: int) -> float:
    with Session(engine) as s:
        rows = [
            follow(follower_id=1 + (i * 7 + round_no) % PARENTS, followed_id=1 + i % PARENTS)
            for i in range(CHILDREN)
        ]
        s.add_all(rows)
        start = time.perf_counter()
        s.flush()
        elapsed = time.perf_counter() - start
        s.commit()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    tag = uuid.uuid4().hex[:8]
    schemas = [f"bench_live_c_{tag}", f"bench_live_p_{tag}"]
    counted = setup(admin, args.url, schemas[0], Counted, CUser)
    plain = setup(admin, args.url, schemas[1], Plain, PUser)
    try:
        for warm in range(3):  # statement caches, connection pool
            one_flush(counted, CFollow, -1 - warm)
            one_flush(plain, PFollow, -1 - warm)
        with_c, without = [], []
        for r in range(args.rounds):
            # Alternate which goes first so drift in machine load cancels out.
            pair = [(counted, CFollow, with_c), (plain, PFollow, without)]
            for engine, follow, out in pair if r % 2 == 0 else pair[::-1]:
                out.append(one_flush(engine, follow, r))
        with counted.connect() as conn:
            cached = conn.scalar(sa.text("SELECT sum(followers_count) FROM users"))
            actual = conn.scalar(sa.text("SELECT count(*) FROM follows"))
        assert cached == actual, (cached, actual)
        a, b = statistics.median(with_c), statistics.median(without)
        print(f"flush of {CHILDREN} children over {PARENTS} parents, median of {args.rounds}:")
        print(f"  without counters: {b * 1000:8.2f} ms")
        print(f"  with counters:    {a * 1000:8.2f} ms")
        print(f"ratio with/without: {a / b:.2f} (goal <= 1.30)")
    finally:
        counted.dispose()
        plain.dispose()
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(sa.schema.DropSchema(schema, cascade=not is_mysql(args.url)))
        admin.dispose()


if __name__ == "__main__":
    main()
