"""Benchmark: what the application feels during a backfill (commit latency p50/p99), same run.

Usage (PostgreSQL and Redis must be running)::

    .venv/bin/python bench/impact.py                 # 200,000 users, 2,000,000 follows
    .venv/bin/python bench/impact.py --users 50000   # smaller

Same data as bench/backfill.py (its loader; users with follows and posts).
Two application threads each commit one ORM insert of a follow at a time
(the library's live maintenance updates both users' counters in that
transaction, so a commit waits whenever a backfill batch holds one of them).
Phases, one after the other in one run, counters reset before each backfill:

1. idle: the application alone;
2. adaptive: ``enqueue --all --wait`` with the defaults (adaptive batch size,
   throttling on lock waiters and lock timeouts);
3. pinned: ``--batch-size 10000`` with every throttle turned off (the
   unthrottled backfill of earlier versions).

Each backfill runs with 2 Dramatiq worker processes through Redis and is
checked against an independent COUNT afterwards (no drift allowed). Printed
last: p50/p99 commit latency per phase and the ratios the issue asks for
(p99 during minus idle, adaptive time over pinned time).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import backfill as bf  # noqa: E402  (bench/ is not a package)

#: Throttles off: the unthrottled baseline.
UNTHROTTLED = (
    "lock_timeout_ms = 0\nthrottle_lock_waiters = false\n"
    "throttle_autovacuum = false\nmax_replica_lag_seconds = 0\n"
)


class App:
    """Two threads committing one follow each, recording (finish time, latency) per commit."""

    def __init__(self, url: str, users: int, threads: int = 2) -> None:
        import bench_models

        self.models = bench_models
        self.engine = sa.create_engine(url, pool_size=threads + 1)
        self.users = users
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)
        ]

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            a, b = rng.randint(1, self.users), rng.randint(1, self.users)
            started = time.monotonic()
            try:
                with Session(self.engine) as session:
                    session.add(self.models.Follow(follower_id=a, followed_id=b))
                    session.commit()
            except Exception as exc:  # reported, and the benchmark fails
                self.errors.append(str(exc).splitlines()[0])
                continue
            end = time.monotonic()
            self.samples.append((end, end - started))

    def __enter__(self) -> App:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        self.engine.dispose()

    def window(self, start: float, end: float) -> list[float]:
        """Latencies (seconds) of commits that finished within ``[start, end]``."""
        return [lat for at, lat in self.samples if start <= at <= end]


def percentiles(latencies: list[float]) -> tuple[float, float, int]:
    """(p50, p99) in milliseconds and the number of commits."""
    if len(latencies) < 2:
        return float("nan"), float("nan"), len(latencies)
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49] * 1000, cuts[98] * 1000, len(latencies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000, help="parents (default 200,000)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/counterfill_bench"
        ),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of the idle phase")
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=None,
        help="batch_seconds of the adaptive phase (default: the library's, 0.03)",
    )
    parser.add_argument(
        "--keep-logs", metavar="DIR", help="copy the workers' log of each backfill into DIR"
    )
    args = parser.parse_args(argv)

    users = args.users
    schema = f"counterfill_bench_{users}"
    bf.ensure_database(args.database_url)
    admin = sa.create_engine(args.database_url)
    bf.autocommit(admin, f"CREATE SCHEMA IF NOT EXISTS {schema}")
    admin.dispose()
    sep = "&" if "?" in args.database_url else "?"
    url = f"{args.database_url}{sep}options=-csearch_path%3D{schema}"
    engine = sa.create_engine(url)
    bf.log(f"{users:,} users, {users * bf.FOLLOWS_PER_USER:,} follows in schema {schema}")
    if not bf.loaded(engine, users):
        bf.log("loading data...")
        bf.load(engine, users, shuffle=False)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    results: dict[str, tuple[float, float, int]] = {}
    seconds: dict[str, float] = {}
    target = f"batch_seconds = {args.batch_seconds}\n" if args.batch_seconds else ""
    phases = {
        "adaptive": ((), target),
        "pinned": (("--batch-size", "10000"), UNTHROTTLED),
    }
    bf.reset(engine)
    with App(url, users) as app:
        bf.log(f"idle: the application alone for {args.idle:.0f}s ...")
        start = time.monotonic()
        time.sleep(args.idle)
        results["idle"] = percentiles(app.window(start, time.monotonic()))
    for name, (extra_args, ini_extra) in phases.items():
        bf.reset(engine)
        with App(url, users) as app:
            time.sleep(2)  # the application is warm before the backfill starts
            bf.log(f"{name}: backfill while the application writes ...")
            info = bf.library(
                engine,
                url,
                users,
                args.redis_url,
                1,
                extra_args=extra_args,
                ini_extra=ini_extra,
                keep_logs=args.keep_logs,
            )
            end = info["started"] + info["seconds"]
            results[name] = percentiles(app.window(info["started"], end))
            seconds[name] = info["seconds"]
            errors = list(app.errors)
        wrong = bf.drift(engine)
        bf.log(
            f"  {info['seconds']:.1f} s, {wrong} users wrong afterwards, {len(errors)} app errors"
        )
        if wrong or errors:
            raise SystemExit(f"{name}: {wrong} users wrong, app errors: {errors[:3]}")
    engine.dispose()

    bf.log("")
    bf.log(f"load average before: {load_before}")
    for name, (p50, p99, n) in results.items():
        extra = f", backfill {seconds[name]:.1f} s" if name in seconds else ""
        bf.log(
            f"{name:9s} commit latency p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({n} commits{extra})"
        )
    idle99 = results["idle"][1]
    for name in phases:
        bf.log(f"p99 {name} - idle = {results[name][1] - idle99:+.1f} ms  (goal <= +20 ms)")
    bf.log(
        f"backfill time adaptive/pinned = {seconds['adaptive'] / seconds['pinned']:.2f}  "
        "(goal <= 1.5)"
    )


if __name__ == "__main__":
    main()
