"""Hot parent: 16 threads each committing one ORM insert of a child of the SAME parent.

Run by hand (PostgreSQL, or MariaDB with ``--url mysql+pymysql://root@127.0.0.1:3306/mysql``):

    .venv/bin/python bench/hot_parent.py [--url URL] [--threads 16] [--seconds 3] [--rounds 3]

Four modes alternate in one run, ``--seconds`` each per round, so machine
noise hits them alike:

- ``uncounted``: the same statements inside ``paused()`` (no counter work);
- ``buffered``: ``counter_cache(..., buffered=True)``: each commit appends a
  delta row; folds run inline on a timer thread (the embedded default);
- ``unbuffered``: the default ``c = c + 1`` after the child insert;
- ``lock-early``: unbuffered, with the parent locked (``FOR NO KEY UPDATE``)
  before the child insert instead of after it (the question of issue 14).

Each mode writes to its own parent (row) and, for the counted ones, its own
counter, so no mode's counter is disturbed by another's paused writes. During
the buffered phases a checker reads ``counter_value()`` and ``COUNT(*)`` in one
REPEATABLE READ snapshot at random moments; they must be equal, as must the
column and ``COUNT(*)`` after a final fold. A sampler records the age of the
oldest pending delta every 50 ms while buffered writers run: its p99 bounds
the fold lag. Goals: buffered
at least 0.6x uncounted throughput, fold lag p99 under 1 s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alembic_counterfill import counter_cache, counter_value, paused
from alembic_counterfill import fold as folding


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    followers_count: Mapped[int] = counter_cache("Follow.followed_id", buffered=True)
    fans_count: Mapped[int] = counter_cache("Fan.idol_id")


class Follow(Base):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)


class Fan(Base):
    __tablename__ = "fans"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    fan_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    idol_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)


USERS = 1000
BUFFERED, UNCOUNTED, UNBUFFERED, EARLY = 1, 2, 3, 4


class EarlyLockSession(Session):
    """A session that locks the parents of new ``Fan`` rows before the flush inserts them."""


@event.listens_for(EarlyLockSession, "before_flush")
def _lock_early(session: Session, flush_context: Any, instances: Any) -> None:
    ids = sorted({o.idol_id for o in session.new if isinstance(o, Fan)})
    if ids:
        session.execute(
            sa.select(User.id)
            .where(User.id.in_(ids))
            .order_by(User.id)
            .with_for_update(key_share=True)
        )


def writer(engine: sa.Engine, mode: int, stop: threading.Event, out: list[int]) -> None:
    done = 0
    rng = random.Random()
    cls = EarlyLockSession if mode == EARLY else Session
    while not stop.is_set():
        who = rng.randint(10, USERS)
        with cls(engine) as s:
            if mode == BUFFERED:
                s.add(Follow(follower_id=who, followed_id=BUFFERED))
                s.commit()
            elif mode == UNCOUNTED:
                with paused():
                    s.add(Follow(follower_id=who, followed_id=UNCOUNTED))
                    s.commit()
            else:
                s.add(Fan(fan_id=who, idol_id=mode))
                s.commit()
        done += 1
    out.append(done)


def check_snapshot(engine: sa.Engine) -> tuple[int, int]:
    """counter_value() and COUNT(*) of the buffered parent, read in one snapshot."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with Session(bind=conn) as s:
            user = s.get(User, BUFFERED)
            value = counter_value(s, user, "followers_count")
            truth = s.scalar(
                sa.select(sa.func.count()).select_from(Follow).where(Follow.followed_id == BUFFERED)
            )
            s.rollback()
    return int(value), int(truth or 0)


def run_phase(
    engine: sa.Engine, mode: int, threads: int, seconds: float, on_tick: Callable[[], None] | None
) -> float:
    stop = threading.Event()
    counts: list[int] = []
    workers = [
        threading.Thread(target=writer, args=(engine, mode, stop, counts)) for _ in range(threads)
    ]
    start = time.perf_counter()
    for w in workers:
        w.start()
    end = start + seconds
    while time.perf_counter() < end:
        if on_tick is not None:
            on_tick()
        time.sleep(random.uniform(0.05, 0.3))
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    schema = f"bench_hot_{uuid.uuid4().hex[:8]}"
    innodb = admin.dialect.name in ("mysql", "mariadb")
    with admin.begin() as conn:
        # MariaDB/MySQL: a database of its own; PostgreSQL: a schema of its own.
        if innodb:
            conn.execute(sa.text(f"CREATE DATABASE {schema}"))
        else:
            conn.execute(sa.schema.CreateSchema(schema))
    pool = {"pool_size": args.threads + 4, "max_overflow": 4}
    if innodb:
        engine = sa.create_engine(sa.make_url(args.url).set(database=schema), **pool)
    else:
        engine = sa.create_engine(
            args.url, connect_args={"options": f"-csearch_path={schema}"}, **pool
        )
    ages: list[float] = []
    sampling = threading.Event()
    checks: list[tuple[int, int]] = []

    in_buffered = threading.Event()  # sample only while buffered writers run

    def sample() -> None:
        while not sampling.is_set():
            if not in_buffered.wait(0.05):
                continue
            with engine.connect() as conn:
                age = folding.pending(conn, User.__table__).oldest_seconds  # type: ignore[arg-type]
            ages.append(age or 0.0)
            sampling.wait(0.05)

    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([User(id=i) for i in range(1, USERS + 1)])
            s.commit()
        for mode in (BUFFERED, UNCOUNTED, UNBUFFERED, EARLY):  # warm-up
            run_phase(engine, mode, args.threads, 0.5, None)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        names = {
            UNCOUNTED: "uncounted",
            BUFFERED: "buffered",
            UNBUFFERED: "unbuffered",
            EARLY: "lock-early",
        }
        rates: dict[int, list[float]] = {m: [] for m in names}
        order = [UNCOUNTED, BUFFERED, UNBUFFERED, EARLY]
        for r in range(args.rounds):
            for mode in order if r % 2 == 0 else order[::-1]:
                tick = (lambda: checks.append(check_snapshot(engine))) if mode == BUFFERED else None
                if mode == BUFFERED:
                    in_buffered.set()
                rates[mode].append(run_phase(engine, mode, args.threads, args.seconds, tick))
                in_buffered.clear()
        sampling.set()
        sampler.join()
        checks.append(check_snapshot(engine))
        folding.fold(
            engine, [User.followers_count.property.columns[0].info["counterfill"].resolved]
        )
        with engine.connect() as conn:
            column = conn.scalar(sa.select(User.followers_count).where(User.id == BUFFERED))
            truth = conn.scalar(
                sa.select(sa.func.count()).select_from(Follow).where(Follow.followed_id == BUFFERED)
            )
            fans = conn.scalar(sa.select(User.fans_count).where(User.id == UNBUFFERED))
            fans_truth = conn.scalar(
                sa.select(sa.func.count()).select_from(Fan).where(Fan.idol_id == UNBUFFERED)
            )
        wrong = [c for c in checks if c[0] != c[1]]
        base = statistics.median(rates[UNCOUNTED])
        print(
            f"{args.threads} threads, one parent per mode, "
            f"{args.rounds} x {args.seconds:.0f}s per mode:"
        )
        for mode in order:
            rate = statistics.median(rates[mode])
            print(f"  {names[mode]:<11} {rate:8.0f} commits/s  ({rate / base:.2f}x uncounted)")
        ages.sort()
        p99 = ages[int(0.99 * (len(ages) - 1))] if ages else 0.0
        print(
            f"fold lag (age of the oldest pending delta, {len(ages)} samples): "
            f"p50 {ages[len(ages) // 2]:.3f}s, p99 {p99:.3f}s, max {ages[-1]:.3f}s"
        )
        print(f"counter_value() == COUNT(*) in {len(checks) - len(wrong)}/{len(checks)} snapshots")
        print(
            f"after the final fold: column {column}, COUNT(*) {truth}; "
            f"unbuffered {fans} vs {fans_truth}"
        )
        ok = not wrong and column == truth and fans == fans_truth
        print("exact: yes" if ok else f"exact: NO {wrong[:5]}")
    finally:
        engine.dispose()
        with admin.begin() as conn:
            if innodb:
                conn.execute(sa.text(f"DROP DATABASE {schema}"))
            else:
                conn.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()


if __name__ == "__main__":
    main()
