"""Where a counted links flush spends its CPU: time (this thread) per library hook, no profiler.

Run by hand:

    .venv/bin/python bench/live_hooks.py [--url URL] [--rounds 60]

The links case of ``bench/live_overhead.py`` (1,000 links appended across 100
users' ``relationship(secondary=links)`` collections), counted schema only.
Each listed function is wrapped with a ``time.thread_time`` accumulator
(event listeners re-registered wrapped), so the figures include about 1 µs
of wrapper per call; nested functions count inside their callers too.
cProfile inflates this per-link Python several-fold and moves garbage
collection pauses onto whatever runs then, so it misleads here. The hooks
of the engine (``before_execute``/``after_execute``) also count the
statements that prepare each round (loading the users, deleting the links).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import live_overhead as lo
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from alembic_counterfill import association, flush, innodb, link_locks, readonly

spent: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kw: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            spent[name] += time.thread_time() - start
            calls[name] += 1

    return timed


INNER = [
    (association, "collection_parents"),
    (association, "begin_flush"),
    (association, "defer_locks"),
    (association, "_inserted"),
    (flush, "_lock_before_writes"),
    (flush, "_collection_changes"),
    (flush, "_owning_collections"),
    (link_locks, "run_due"),
    (innodb, "add_deltas_locking"),
]
LISTENERS = [
    (Session, "before_flush", readonly, "discard_assignments", {}),
    (Session, "before_flush", flush, "before_flush", {}),
    (Session, "after_flush", flush, "after_flush", {}),
    (Session, "after_flush_postexec", flush, "after_flush_postexec", {}),
    (sa.Engine, "before_execute", association, "before_execute", {"retval": True}),
    (sa.Engine, "after_execute", association, "after_execute", {}),
]


def wrap_all() -> None:
    """Wrap the library's functions and listeners (called through module globals)."""
    sa.orm.configure_mappers()  # registers the engine-wide hooks
    for module, name in INNER:
        setattr(module, name, _timed(name, getattr(module, name)))
    for target, identifier, module, name, kw in LISTENERS:
        fn = getattr(module, name)
        event.remove(target, identifier, fn)
        event.listen(target, identifier, _timed(name, fn), **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    wrap_all()
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    schema = f"bench_hooks_{uuid.uuid4().hex[:8]}"
    counted = lo.setup(admin, args.url, schema, lo.Counted, lo.CUser)
    try:
        for warm in range(3):
            lo.one_link_flush(counted, lo.CUser, lo.c_links, -1 - warm)
        spent.clear()
        calls.clear()
        cpu = [lo.one_link_flush(counted, lo.CUser, lo.c_links, r)[1] for r in range(args.rounds)]
        median = statistics.median(cpu) * 1000
        print(f"counted links flush, median CPU of {args.rounds}: {median:.2f} ms")
        for name, total in spent.most_common():
            per = total / args.rounds * 1000
            print(f"  {name:22s} {per:7.3f} ms per round  ({calls[name] / args.rounds:.0f} calls)")
    finally:
        counted.dispose()
        with admin.begin() as conn:
            conn.execute(sa.schema.DropSchema(schema, cascade=not lo.is_mysql(args.url)))
        admin.dispose()


if __name__ == "__main__":
    main()
