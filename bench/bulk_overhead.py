"""Overhead of exact counters on ORM bulk statements: the same work with counters and without.

Inserts 100,000 follows across 10,000 users with one ORM bulk INSERT
(``session.execute(insert(Follow), rows)``), then deletes half of them with one
``session.execute(delete(Follow).where(...))``, each in its own transaction.
"Without" runs the identical statements inside ``alembic_counterfill.paused()``
(same tables, indexes and counter columns, no maintenance); "with" lets the
library keep ``followers_count`` and ``following_count`` exact, which is then
checked against COUNT(*). Runs alternate and the median of ``--repeat`` runs is
reported, both ratios side by side. Goal: at most 1.5 for both.

The bare delete leaves the counters wrong, so it is not what a user would do
otherwise. The honest baseline for the delete (same run, same data) is the
bare delete returning the children's parent keys, followed by one set-based
recount of exactly the touched parents, in the same transaction. Goal: the
counted bulk delete at most 1.2x that.

    python bench/bulk_overhead.py                       # PostgreSQL (COUNTERFILL_TEST_PG)
    python bench/bulk_overhead.py --url sqlite:///b.db  # SQLite
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from contextlib import nullcontext
from typing import Any

import sqlalchemy as sa
from bench_models import Base, Follow, User
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from alembic_counterfill import paused
from alembic_counterfill.testing import find_drift

PG_URL = os.environ.get("COUNTERFILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def reset(engine: sa.Engine, users: int) -> None:
    """Empty tables holding ``users`` users with zero counters, statistics fresh."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s, paused():
        s.execute(sa.insert(User), [{"id": i, "name": f"u{i}"} for i in range(1, users + 1)])
        s.commit()
    analyze(engine)


def analyze(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE"))
        conn.commit()


def timed(engine: sa.Engine, stmt: Any, params: Any, tracked: bool) -> float:
    """Seconds for one statement plus its commit, with or without counter maintenance."""
    with Session(engine) as s, nullcontext() if tracked else paused():
        start = time.perf_counter()
        s.execute(stmt, params)
        s.commit()
        return time.perf_counter() - start


def recount(ids: list[int], dialect: str) -> Any:
    """One UPDATE setting both counters of ``ids`` from grouped counts (index range scans)."""
    f = Follow.__table__
    if dialect == "postgresql":
        wanted: Any = sa.bindparam("ids", ids, type_=postgresql.ARRAY(sa.Integer))
        among = sa.any_(wanted)
    else:
        among = None
    groups = []
    for fk in (f.c.followed_id, f.c.follower_id):
        cond = fk == among if among is not None else fk.in_(ids)
        groups.append(
            sa.select(fk.label("k"), sa.func.count().label("n")).where(cond).group_by(fk).subquery()
        )
    u = User.__table__.alias("u")
    scope = u.c.id == among if among is not None else u.c.id.in_(ids)
    truth = (
        sa.select(
            u.c.id,
            sa.func.coalesce(groups[0].c.n, 0).label("followers"),
            sa.func.coalesce(groups[1].c.n, 0).label("following"),
        )
        .select_from(
            u.outerjoin(groups[0], groups[0].c.k == u.c.id).outerjoin(
                groups[1], groups[1].c.k == u.c.id
            )
        )
        .where(scope)
        .subquery()
    )
    return (
        sa.update(User.__table__)
        .where(User.__table__.c.id == truth.c.id)
        .values(followers_count=truth.c.followers, following_count=truth.c.following)
    )


def delete_then_recount(engine: sa.Engine, where: Any) -> float:
    """The bare delete, then one recount of exactly the parents it touched (one transaction)."""
    with Session(engine) as s, paused():
        start = time.perf_counter()
        gone = s.execute(
            sa.delete(Follow).where(where).returning(Follow.follower_id, Follow.followed_id)
        ).all()
        touched = sorted({pid for row in gone for pid in row})
        s.execute(recount(touched, s.get_bind().dialect.name))
        s.commit()
        return time.perf_counter() - start


#: Modes of one run: paused (bare statements), baseline (bare delete + recount), tracked.
PAUSED, BASELINE, TRACKED = "without", "delete+recount", "with"


def one_run(engine: sa.Engine, users: int, follows: int, mode: str) -> tuple[float, float]:
    rnd = random.Random(42)
    rows = []
    for i in range(1, follows + 1):
        a, b = rnd.sample(range(1, users + 1), 2)
        rows.append({"id": i, "follower_id": a, "followed_id": b})
    reset(engine, users)
    tracked = mode == TRACKED
    if mode == BASELINE:
        # Start from exact counters, so the recount's result can be checked too.
        timed(engine, sa.insert(Follow), rows, True)
        t_insert = 0.0
    else:
        t_insert = timed(engine, sa.insert(Follow), rows, tracked)
    analyze(engine)  # every mode deletes with the same fresh statistics
    where = Follow.id <= follows // 2
    if mode == BASELINE:
        t_delete = delete_then_recount(engine, where)
    else:
        t_delete = timed(engine, sa.delete(Follow).where(where), None, tracked)
    if mode != PAUSED:
        drift = find_drift(engine, Base)
        assert not drift, f"{mode}: {len(drift)} counters drifted, e.g. {drift[:3]}"
    return t_insert, t_delete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: a fresh schema on PostgreSQL)")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--follows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    schema = None
    url = args.url
    if url is None:
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.schema.CreateSchema(schema))
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    engine = sa.create_engine(url)
    try:
        modes = (PAUSED, BASELINE, TRACKED)
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for mode in modes:  # warm up: imports, caches, connections
            one_run(engine, 1_000, 5_000, mode)
        for r in range(args.repeat):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                times[mode].append(one_run(engine, args.users, args.follows, mode))
        med = {
            k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
            for k, v in times.items()
        }
        print(
            f"{engine.dialect.name}: {args.follows:,} follows over {args.users:,} users, "
            f"median of {args.repeat} runs (counters exact after every tracked run)"
        )
        print(f"{'':24}{'without':>10}{'with':>10}{'ratio':>8}")
        for i, label in enumerate(("bulk insert", f"bulk delete of {args.follows // 2:,}")):
            plain, tracked = med[PAUSED][i], med[TRACKED][i]
            print(f"{label:24}{plain:9.3f}s{tracked:9.3f}s{tracked / plain:8.2f}")
        base, tracked = med[BASELINE][1], med[TRACKED][1]
        print(
            f"{'delete + recount':24}{base:9.3f}s{tracked:9.3f}s{tracked / base:8.2f}"
            "  (honest baseline: bare delete, then recount of the touched parents; goal <= 1.2)"
        )
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()
        if schema is not None:
            with admin.connect() as conn:
                conn.execute(sa.schema.DropSchema(schema, cascade=True))
            admin.dispose()


if __name__ == "__main__":
    main()
