"""Benchmark: what a batch's SQL costs PostgreSQL per row, against the monolithic statement.

Usage (PostgreSQL on this machine, data loaded by bench/backfill.py)::

    .venv/bin/python bench/batch_cost.py --scale 0.1 --rounds 2

Runs, on the data bench/backfill.py loaded (its schema for ``--scale``), with
the counters reset to 0 and ``users`` rewritten before each (as there):

- ``mono``: the monolithic ``UPDATE`` of bench/backfill.py's (b), one statement;
- ``ranges N xK``: the batch's own statements (``sql.lock_parents`` then
  ``sql.recount_range``, a commit after each range) over ranges of N parents,
  on K connections at once (each takes every K-th range); ``jit`` and
  ``synchronous_commit`` off, as the batches set them.

For each it prints the wall time and the CPU time the server's backends
spent (``utime + stime`` of each backend from ``/proc``, so only with the
server on this machine): wall time follows the machine's load, backend CPU
time much less, so the CPU column is the one to compare per row. No Python
worker, broker or bookkeeping is involved: this isolates the SQL.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import sqlalchemy as sa

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import backfill as bf  # noqa: E402  (bench/ is not a package)
import bench_models  # noqa: E402

from alembic_counterfill import sql  # noqa: E402
from alembic_counterfill.counters import counters_of  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) backend ``pid`` has used, or None when it is not local."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def ranges_on_one_connection(
    engine: sa.Engine, ranges: list[tuple[int, int]], out: list[tuple[float, float | None]]
) -> None:
    """Lock and recount each range in a transaction of its own, as a pinned batch does."""
    counters = [
        c for c in counters_of(bench_models.Base.metadata) if c.parent_table.name == "users"
    ]
    table, pk = counters[0].parent_table, counters[0].parent_pk
    with engine.connect() as conn:
        pid = conn.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
        conn.execute(sa.select(sa.func.set_config("jit", "off", False)))
        conn.execute(sa.select(sa.func.set_config("synchronous_commit", "off", False)))
        conn.commit()
        cpu0, started = backend_cpu(pid), time.perf_counter()
        for lo, hi in ranges:
            conn.execute(sql.lock_parents(table, pk, lo, hi)).scalar_one()
            conn.execute(sql.recount_range(counters, lo, hi))
            conn.commit()
        wall = time.perf_counter() - started
        cpu1 = backend_cpu(pid)
    out.append((wall, None if cpu0 is None or cpu1 is None else cpu1 - cpu0))


def monolithic(engine: sa.Engine) -> tuple[float, float | None]:
    """bench/backfill.py's (b), with the server's own JIT setting."""
    with engine.connect() as conn:
        pid = conn.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
        conn.commit()
        cpu0, started = backend_cpu(pid), time.perf_counter()
        conn.execute(sa.text(bf.MONOLITHIC))
        conn.commit()
        wall = time.perf_counter() - started
        cpu1 = backend_cpu(pid)
    return wall, None if cpu0 is None or cpu1 is None else cpu1 - cpu0


def ranges(
    engine: sa.Engine, users: int, size: int, connections: int
) -> tuple[float, float | None]:
    """Every range of ``size`` parents, shared round-robin by ``connections`` threads."""
    keys = [(lo, lo + size) for lo in range(1, users + 1, size)]
    out: list[tuple[float, float | None]] = []
    threads = [
        threading.Thread(target=ranges_on_one_connection, args=(engine, keys[i::connections], out))
        for i in range(connections)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpus = [c for _, c in out]
    return wall, None if None in cpus else sum(c for c in cpus if c is not None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="as bench/backfill.py's")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/counterfill_bench"
        ),
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every case, interleaved")
    parser.add_argument(
        "--cases",
        default="mono,10000x1,10000x2,5000x2,1000x1,500x1",
        help="comma-separated: mono, or SIZExCONNECTIONS",
    )
    args = parser.parse_args(argv)
    users = int(bf.DEFAULT_USERS * args.scale)
    schema = f"counterfill_bench_{users}"
    sep = "&" if "?" in args.database_url else "?"
    engine = sa.create_engine(f"{args.database_url}{sep}options=-csearch_path%3D{schema}")
    if not bf.loaded(engine, users):
        raise SystemExit(f"no data in schema {schema}: run bench/backfill.py --scale {args.scale}")
    bf.log(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for round_ in range(1, args.rounds + 1):
        for case in args.cases.split(","):
            bf.reset(engine)
            if case == "mono":
                wall, cpu = monolithic(engine)
            else:
                size, connections = (int(x) for x in case.split("x"))
                wall, cpu = ranges(engine, users, size, connections)
            wrong = bf.drift(engine)
            if wrong:
                raise SystemExit(f"{case} left {wrong} users wrong")
            shown = "n/a (server not local)" if cpu is None else f"{cpu:.2f} s"
            bf.log(f"round {round_} {case:>9}: wall {wall:.2f} s, backend CPU {shown}, 0 wrong")
    bf.log(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    engine.dispose()


if __name__ == "__main__":
    main()
