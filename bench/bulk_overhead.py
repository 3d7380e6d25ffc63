"""Overhead of exact counters on ORM bulk statements: the same work with counters and without.

Inserts 100,000 follows across 10,000 users with one ORM bulk INSERT
(``session.execute(insert(Follow), rows)``), then deletes half of them with one
``session.execute(delete(Follow).where(...))``, each in its own transaction.
"Without" runs the identical statements inside ``alembic_counterfill.paused()``
(same tables, indexes and counter columns, no maintenance); "with" lets the
library keep ``followers_count`` and ``following_count`` exact, which is then
checked against COUNT(*). Runs alternate and the median of ``--repeat`` runs is
reported, both ratios side by side. Goal: at most 1.5 for both.

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


def one_run(engine: sa.Engine, users: int, follows: int, tracked: bool) -> tuple[float, float]:
    rnd = random.Random(42)
    rows = []
    for i in range(1, follows + 1):
        a, b = rnd.sample(range(1, users + 1), 2)
        rows.append({"id": i, "follower_id": a, "followed_id": b})
    reset(engine, users)
    t_insert = timed(engine, sa.insert(Follow), rows, tracked)
    analyze(engine)  # both modes delete with the same fresh statistics
    t_delete = timed(engine, sa.delete(Follow).where(Follow.id <= follows // 2), None, tracked)
    if tracked:
        drift = find_drift(engine, Base)
        assert not drift, f"{len(drift)} counters drifted, e.g. {drift[:3]}"
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
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        one_run(engine, 1_000, 5_000, True)  # warm up: imports, caches, connections
        for _ in range(args.repeat):
            for tracked in (False, True):
                times[tracked].append(one_run(engine, args.users, args.follows, tracked))
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
            plain, tracked = med[False][i], med[True][i]
            print(f"{label:24}{plain:9.3f}s{tracked:9.3f}s{tracked / plain:8.2f}")
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()
        if schema is not None:
            with admin.connect() as conn:
                conn.execute(sa.schema.DropSchema(schema, cascade=True))
            admin.dispose()


if __name__ == "__main__":
    main()
