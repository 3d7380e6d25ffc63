"""Benchmark: the seed's backfill, the monolithic bound and the library, side by side.

Usage (PostgreSQL and Redis must be running)::

    .venv/bin/python bench/backfill.py                # 1,091,000 users, 10 follows, 5 posts each
    .venv/bin/python bench/backfill.py --scale 0.1    # a tenth of that
    .venv/bin/python bench/backfill.py --scale 0.1 \
        --database-url mysql+pymysql://root@127.0.0.1:3306/counterfill_bench   # on MariaDB

On MariaDB the data goes into a database of its own per scale (MariaDB has
no schemas), generated with the sequence engine instead of
``generate_series``; ``OPTIMIZE TABLE`` / ``ANALYZE TABLE`` stand in for
``VACUUM``, and (b) is the same statement in MySQL's multi-table UPDATE form.

Seed-shaped data is loaded once into its own schema and reused by later runs
of the same scale: users, then each user's 10 follows (followed users skewed
towards low ids) and 5 posts (80% published), inserted user by user as the
seed's generator does, with FK indexes, vacuumed. ``--shuffle`` stores the
children in random physical order instead (the pessimistic case for range
batches: each batch then reads pages scattered over the whole child table).

Before each approach the three counters are reset to 0 and the users table is
rewritten (``VACUUM FULL``) so every approach starts from the same physical
state:

(a) the seed's approach: per counter, batches of 10,000 ids,
    ``UPDATE users SET c = (SELECT count(*) ...) WHERE id IN (...)``;
(b) the monolithic bound: one set-based UPDATE for all three counters, no batching;
(c) the library: ``alembic-counterfill enqueue --all --wait`` with 2 Dramatiq
    worker processes (``dramatiq alembic_counterfill.worker``) through Redis.

Every approach is checked against an independent COUNT afterwards. The ratios
are printed last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

BENCH_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DEFAULT_USERS = 1_091_000
FOLLOWS_PER_USER = 10
POSTS_PER_USER = 5
SEED_BATCH = 10_000
COUNTERS = ("followers_count", "following_count", "posts_count")

#: The seed's per-counter subqueries (what each counter counts).
SEED_SUBQUERY = {
    "followers_count": "SELECT count(*) FROM follows f WHERE f.followed_id = users.id",
    "following_count": "SELECT count(*) FROM follows f WHERE f.follower_id = users.id",
    "posts_count": "SELECT count(*) FROM posts p WHERE p.author_id = users.id AND p.published",
}

# The true value of each counter, joined to every user (u): shared by (b) and the drift check.
TRUTH_JOINS = """
LEFT JOIN (SELECT followed_id AS k, count(*) AS n FROM follows GROUP BY followed_id) f1
       ON f1.k = u.id
LEFT JOIN (SELECT follower_id AS k, count(*) AS n FROM follows GROUP BY follower_id) f2
       ON f2.k = u.id
LEFT JOIN (SELECT author_id AS k, count(*) AS n FROM posts WHERE published GROUP BY author_id) p
       ON p.k = u.id
"""

MONOLITHIC = f"""
UPDATE users SET followers_count = coalesce(f1.n, 0), following_count = coalesce(f2.n, 0),
                 posts_count = coalesce(p.n, 0)
FROM users u
{TRUTH_JOINS}WHERE users.id = u.id
"""

MONOLITHIC_MYSQL = f"""
UPDATE users u
{TRUTH_JOINS}SET u.followers_count = coalesce(f1.n, 0), u.following_count = coalesce(f2.n, 0),
    u.posts_count = coalesce(p.n, 0)
"""

DRIFT = f"""
SELECT count(*) FROM users u
{TRUTH_JOINS}WHERE u.followers_count <> coalesce(f1.n, 0) OR u.following_count <> coalesce(f2.n, 0)
   OR u.posts_count <> coalesce(p.n, 0)
"""


def is_mysql(engine: sa.Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def log(message: str) -> None:
    print(message, flush=True)


def autocommit(engine: sa.Engine, *statements: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def load(engine: sa.Engine, users: int, shuffle: bool) -> None:
    """Create and fill the tables: children user by user, or in random order (``shuffle``)."""
    sys.path.insert(0, str(BENCH_DIR))
    import bench_models

    started = time.monotonic()
    bench_models.Base.metadata.drop_all(engine)
    autocommit(
        engine,
        "DROP TABLE IF EXISTS counterfill_batches, counterfill_runs, counterfill_counters, "
        "counterfill_workers",
    )
    tables = bench_models.Base.metadata.sorted_tables
    indexes = [ix for t in tables for ix in t.indexes]
    foreign_keys = [fk for t in tables for fk in t.foreign_key_constraints]
    if is_mysql(engine):
        _load_mysql(engine, users, shuffle, started)
        return
    order = "ORDER BY random()" if shuffle else "ORDER BY u, k"
    with engine.begin() as conn:
        # Indexes and foreign keys come after the load: much faster than row by row.
        for table in tables:
            conn.execute(sa.schema.CreateTable(table, include_foreign_key_constraints=[]))
        conn.execute(sa.text("SELECT setseed(0.42)"))
        conn.execute(
            sa.text(
                "INSERT INTO users (id, name) SELECT g, 'user' || g FROM generate_series(1, :n) g"
            ),
            {"n": users},
        )
        log(f"  users loaded ({time.monotonic() - started:.0f}s)")
        # Followed users skewed towards low ids (a few users have most followers).
        conn.execute(
            sa.text(
                "INSERT INTO follows (follower_id, followed_id) "
                "SELECT u, 1 + floor(:n * power(random(), 3))::int "
                f"FROM generate_series(1, :n) u, generate_series(1, :k) k {order}"
            ),
            {"n": users, "k": FOLLOWS_PER_USER},
        )
        log(f"  follows loaded ({time.monotonic() - started:.0f}s)")
        conn.execute(
            sa.text(
                "INSERT INTO posts (author_id, published) SELECT u, random() < 0.8 "
                f"FROM generate_series(1, :n) u, generate_series(1, :k) k {order}"
            ),
            {"n": users, "k": POSTS_PER_USER},
        )
        log(f"  posts loaded ({time.monotonic() - started:.0f}s)")
        for ix in indexes:
            conn.execute(sa.schema.CreateIndex(ix))
        for fk in foreign_keys:
            conn.execute(sa.schema.AddConstraint(fk))
    autocommit(engine, "VACUUM ANALYZE users", "VACUUM ANALYZE follows", "VACUUM ANALYZE posts")
    log(f"  indexed and vacuumed ({time.monotonic() - started:.0f}s)")


def _load_mysql(engine: sa.Engine, users: int, shuffle: bool, started: float) -> None:
    """:func:`load` on MariaDB: the sequence engine's ``seq_1_to_N`` tables for generate_series."""
    import bench_models

    tables = bench_models.Base.metadata.sorted_tables
    order = "ORDER BY rand(42)" if shuffle else "ORDER BY u.seq, k.seq"
    n = int(users)  # a table name of the sequence engine: an integer we computed, never input
    with engine.begin() as conn:
        for table in tables:
            conn.execute(sa.schema.CreateTable(table))
        conn.execute(
            sa.text(
                f"INSERT INTO users (id, name) SELECT seq, concat('user', seq) FROM seq_1_to_{n}"
            )
        )
        log(f"  users loaded ({time.monotonic() - started:.0f}s)")
        conn.execute(
            sa.text(
                "INSERT INTO follows (follower_id, followed_id) "
                "SELECT u.seq, 1 + floor(:n * pow(rand(7), 3)) "
                f"FROM seq_1_to_{n} u, seq_1_to_{FOLLOWS_PER_USER} k {order}"
            ),
            {"n": n},
        )
        log(f"  follows loaded ({time.monotonic() - started:.0f}s)")
        conn.execute(
            sa.text(
                "INSERT INTO posts (author_id, published) SELECT u.seq, rand(11) < 0.8 "
                f"FROM seq_1_to_{n} u, seq_1_to_{POSTS_PER_USER} k {order}"
            )
        )
        log(f"  posts loaded ({time.monotonic() - started:.0f}s)")
    autocommit(engine, "ANALYZE TABLE users, follows, posts")
    log(f"  analyzed ({time.monotonic() - started:.0f}s)")


def all_visible(engine: sa.Engine) -> float:
    """Share of heap pages VACUUM marked all-visible (index-only scans need them)."""
    if is_mysql(engine):
        return 1.0  # InnoDB's secondary indexes need no visibility map
    with engine.connect() as conn:
        pages, visible = conn.execute(
            sa.text(
                "SELECT sum(relpages), sum(relallvisible) FROM pg_class "
                "WHERE relname IN ('users', 'follows', 'posts') "
                "AND relnamespace = current_schema()::regnamespace"
            )
        ).one()
    return float(visible or 0) / float(pages or 1)


def ensure_database(url: str) -> None:
    """Create the benchmark's database if it does not exist."""
    target = sa.make_url(url)
    if target.get_backend_name() in ("mysql", "mariadb"):
        return  # main() creates the per-scale database
    maintenance = sa.create_engine(target.set(database="postgres"))
    with maintenance.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        exists = conn.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": target.database}
        ).scalar()
        if not exists:
            conn.execute(sa.text(f'CREATE DATABASE "{target.database}"'))
    maintenance.dispose()


def loaded(engine: sa.Engine, users: int) -> bool:
    """Whether the schema already holds this scale's data."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("posts"):
            return False
        n_users = conn.execute(sa.text("SELECT count(*) FROM users")).scalar_one()
        n_posts = conn.execute(sa.text("SELECT count(*) FROM posts")).scalar_one()
    return n_users == users and n_posts == users * POSTS_PER_USER


def reset(engine: sa.Engine) -> None:
    """Counters to 0, users table rewritten packed, no bookkeeping: the same start for everyone."""
    if is_mysql(engine):
        autocommit(
            engine,
            "DROP TABLE IF EXISTS counterfill_batches, counterfill_runs, counterfill_counters",
            "UPDATE users SET followers_count = 0, following_count = 0, posts_count = 0",
            "OPTIMIZE TABLE users",
            "ANALYZE TABLE users",
        )
        return
    autocommit(
        engine,
        "DROP TABLE IF EXISTS counterfill_batches, counterfill_runs, counterfill_counters, "
        "counterfill_workers",
        "UPDATE users SET followers_count = 0, following_count = 0, posts_count = 0",
        "VACUUM FULL users",
        "VACUUM ANALYZE users",
        "CHECKPOINT",
    )


def drift(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(DRIFT)).scalar_one()


def seed_approach(engine: sa.Engine, url: str, users: int) -> dict[str, float]:
    """(a): per counter, batches of 10,000 ids with a correlated COUNT per row."""
    for column in COUNTERS:
        update = sa.text(
            f"UPDATE users SET {column} = ({SEED_SUBQUERY[column]}) WHERE id IN :ids"
        ).bindparams(sa.bindparam("ids", expanding=True))
        last = 0
        while True:
            with engine.begin() as conn:
                ids = (
                    conn.execute(
                        sa.text("SELECT id FROM users WHERE id > :last ORDER BY id LIMIT :n"),
                        {"last": last, "n": SEED_BATCH},
                    )
                    .scalars()
                    .all()
                )
                if not ids:
                    break
                conn.execute(update, {"ids": list(ids)})
            last = ids[-1]
    return {}


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``, every core).

    Read before and after an approach: on a quiet machine the difference is
    what the approach cost the CPUs (server backends, workers, the CLI), which
    says whether its wall time could go lower on this many cores.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def monolithic(engine: sa.Engine, url: str, users: int) -> dict[str, float]:
    """(b): one set-based UPDATE for all counters of the table."""
    cpu = machine_cpu()
    with engine.begin() as conn:
        conn.execute(sa.text(MONOLITHIC_MYSQL if is_mysql(engine) else MONOLITHIC))
    return {"cpu": machine_cpu() - cpu}


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(x) for x in text)
    return out


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) one process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def library(
    engine: sa.Engine,
    url: str,
    users: int,
    redis_url: str,
    threads: int,
    extra_args: tuple[str, ...] = (),
    ini_extra: str = "",
    phases: bool = False,
    keep_logs: str | None = None,
) -> dict[str, float]:
    """(c): enqueue --all --wait through Redis with 2 worker processes (started beforehand)."""
    import redis

    from alembic_counterfill import progress

    redis.Redis.from_url(redis_url).flushdb()
    with engine.begin() as conn:  # what the migration adding the counters records
        progress.ensure_tables(conn)
        for column in COUNTERS:
            for stmt in progress.request_statements(f"users.{column}", "users", column, None):
                conn.execute(stmt)
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "alembic.ini"
        ini.write_text(
            "[alembic]\nscript_location = migrations\n"
            f"sqlalchemy.url = {url.replace('%', '%%')}\n\n"
            "[counterfill]\nmetadata = bench_models:Base\n"
            f"broker_url = {redis_url}\nqueue = counterfill_bench\n{ini_extra}"
        )
        env = {**os.environ, "ALEMBIC_CONFIG": str(ini)}
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")])
        for key in list(env):
            if key.startswith("COUNTERFILL_"):
                env.pop(key, None)
        logfile = Path(tmp) / "worker.log"
        with open(logfile, "wb") as out:
            worker = subprocess.Popen(
                [
                    str(BIN / "dramatiq"),
                    "alembic_counterfill.worker",
                    "--processes",
                    "2",
                    "--threads",
                    str(threads),
                ],
                cwd=tmp,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while logfile.read_text().count("Worker process is ready for action.") < 2:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"workers did not start:\n{logfile.read_text()}")
                time.sleep(0.05)
            # With --phases the command runs under bench/phases.py, which
            # stamps each phase of the process (same arguments, same code).
            command = [str(BIN / "alembic-counterfill")]
            if phases:
                command = [sys.executable, str(BENCH_DIR / "phases.py")]
            launched = time.time()
            env["COUNTERFILL_PHASES_T0"] = repr(launched)
            cpu = machine_cpu()
            workers_cpu = sum(_process_cpu(pid) for pid in _children(worker.pid))
            cli_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.monotonic()
            result = subprocess.run(
                [
                    *command,
                    "-c",
                    str(ini),
                    "enqueue",
                    "--all",
                    "--wait",
                    *extra_args,
                ],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            seconds = time.monotonic() - started
            cpu = machine_cpu() - cpu
            workers_cpu = sum(_process_cpu(pid) for pid in _children(worker.pid)) - workers_cpu
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cli_cpu_s = (after.ru_utime + after.ru_stime) - (cli_cpu.ru_utime + cli_cpu.ru_stime)
            exited = time.time()
            if result.returncode != 0:
                raise SystemExit(f"enqueue failed:\n{result.stdout}\n{result.stderr}")
            planned = re.search(r"planned and sent in ([\d.]+)s", result.stdout)
            durations = [
                float(x) for x in re.findall(r"rows_changed=\d+ in ([\d.]+)s", logfile.read_text())
            ]
            rss = max(_peak_rss_mb(pid) for pid in _children(worker.pid))
            log("  " + "\n  ".join(result.stdout.strip().splitlines()))
            if durations:
                log(
                    f"  batches: {len(durations)}, mean {sum(durations) / len(durations):.3f}s, "
                    f"max {max(durations):.3f}s, sum {sum(durations):.1f}s over 2 workers"
                )
            log(
                f"  CPU: workers' processes {workers_cpu:.2f} s, enqueue process "
                f"{cli_cpu_s:.2f} s, the rest of the machine (server, Redis) "
                f"{cpu - workers_cpu - cli_cpu_s:.2f} s"
            )
            if phases:
                found = _phases(result.stderr, logfile, launched, exited)
                log(f"  phases (s from process start): {found}")
        finally:
            os.kill(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            if keep_logs:  # the workers' log, for a timeline of the pieces
                Path(keep_logs).mkdir(parents=True, exist_ok=True)
                kept = (
                    Path(keep_logs) / f"worker-{launched:.0f}{'-pinned' if extra_args else ''}.log"
                )
                kept.write_bytes(logfile.read_bytes())
                log(f"  workers' log kept in {kept}")
    return {
        "seconds": seconds,
        "started": started,
        "planning": float(planned.group(1)) if planned else float("nan"),
        "rss_mb": rss,
        "cpu": cpu,
    }


_PIECE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[PID (\d+)\]"
    r".*rows_changed=\d+ in ([\d.]+)s",
    re.M,
)


def _phases(stderr: str, logfile: Path, launched: float, exited: float) -> str:
    """bench/phases.py's stamps, plus the first piece's start and the last one's end (worker log).

    Seconds from the launch of the process; one clock (``time.time()``) on one machine.
    """
    found = re.search(r"^phases: (\{.*\})$", stderr, re.M)
    if not found:
        return "(no phases line)"
    stamps: dict[str, float] = json.loads(found.group(1))
    pieces = [
        (dt.datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp(), pid, float(seconds))
        for at, pid, seconds in _PIECE.findall(logfile.read_text())
    ]
    if pieces:
        stamps["first piece started"] = min(at - s for at, _, s in pieces) - launched
        stamps["last piece done"] = max(at for at, _, _ in pieces) - launched
    stamps["process exited"] = exited - launched
    text = ", ".join(f"{k} {v:.3f}" for k, v in sorted(stamps.items(), key=lambda kv: kv[1]))
    for pid in sorted({pid for _, pid, _ in pieces}):
        mine = [(at, s) for at, p, s in pieces if p == pid]
        text += (
            f"; worker {pid}: {len(mine)} pieces, {sum(s for _, s in mine):.3f}s, "
            f"last done {max(at for at, _ in mine) - launched:.3f}"
        )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help=f"users = scale x {DEFAULT_USERS:,} (default 1)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/counterfill_bench"
        ),
        help="created if missing; a database of its own, so that long transactions in other "
        "databases do not hold VACUUM back",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--reload", action="store_true", help="reload the data even if present")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per worker process for (c) (default 1)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (b), (c) and (p), interleaved; the fastest of each is kept (a noisy "
        "machine)",
    )
    parser.add_argument(
        "--shuffle", action="store_true", help="children in random physical order (own schema)"
    )
    parser.add_argument(
        "--only", default="abc", help="approaches to run, e.g. 'c' (default abc; 'p' = (c) pinned)"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="run (c) and (p) under bench/phases.py and print when each phase of the "
        "enqueue process happened (fixed costs)",
    )
    parser.add_argument(
        "--keep-logs", metavar="DIR", help="copy the workers' log of each (c) and (p) run into DIR"
    )
    args = parser.parse_args(argv)

    users = int(DEFAULT_USERS * args.scale)
    schema = f"counterfill_bench_{users}{'_shuffled' if args.shuffle else ''}"
    ensure_database(args.database_url)
    server = sa.make_url(args.database_url)
    mysql = server.get_backend_name() in ("mysql", "mariadb")
    admin = sa.create_engine(server.set(database="mysql") if mysql else server)
    autocommit(admin, f"CREATE SCHEMA IF NOT EXISTS {schema}")
    admin.dispose()
    sep = "&" if "?" in args.database_url else "?"
    url = f"{args.database_url}{sep}options=-csearch_path%3D{schema}"
    if mysql:
        url = server.set(database=schema).render_as_string(False)
    engine = sa.create_engine(url)
    log(
        f"{users:,} users, {users * FOLLOWS_PER_USER:,} follows, "
        f"{users * POSTS_PER_USER:,} posts in schema {schema}"
    )
    if args.reload or not loaded(engine, users):
        log("loading data...")
        load(engine, users, args.shuffle)
    if mysql:
        autocommit(engine, "ANALYZE TABLE follows, posts")
    else:
        autocommit(engine, "VACUUM ANALYZE follows", "VACUUM ANALYZE posts")
    visible = all_visible(engine)
    if visible < 0.9:
        log(
            f"warning: only {visible:.0%} of heap pages are all-visible (a long transaction "
            "elsewhere holds VACUUM back): index-only scans degrade, timings are pessimistic"
        )

    approaches: dict[str, tuple[str, Callable[..., dict[str, float]]]] = {
        "a": ("(a) seed: per counter, 10,000-id batches, correlated COUNT", seed_approach),
        "b": ("(b) monolithic: one set-based UPDATE, no batches", monolithic),
        "c": (
            "(c) library: enqueue --all --wait, 2 workers via Redis",
            lambda e, u, n: library(
                e,
                u,
                n,
                args.redis_url,
                args.threads,
                phases=args.phases,
                keep_logs=args.keep_logs,
            ),
        ),
        "p": (
            "(p) library, --batch-size 10000 pinned (no adaptation)",
            lambda e, u, n: library(
                e,
                u,
                n,
                args.redis_url,
                args.threads,
                ("--batch-size", "10000"),
                phases=args.phases,
                keep_logs=args.keep_logs,
            ),
        ),
    }
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    timings: dict[str, float] = {}
    every: dict[str, list[float]] = {}
    extra: dict[str, float] = {}
    # Rounds interleave the approaches (b, c, p, b, c, p, ...), so a change in
    # the machine's load hits every approach alike; (a) runs in the first only.
    order = [key for round_ in range(args.repeat) for key in args.only if key != "a" or round_ == 0]
    for key in order:
        label, run = approaches[key]
        reset(engine)
        log(f"{label} ...")
        started = time.monotonic()
        info = run(engine, url, users)
        seconds = info.pop("seconds", time.monotonic() - started)
        timings[key] = min(seconds, timings.get(key, seconds))
        every.setdefault(key, []).append(seconds)
        cpu = info.pop("cpu", None)
        extra.update(info)
        wrong = drift(engine)
        spent = f" ({cpu:.1f} s of machine CPU, {os.cpu_count()} cores)" if cpu is not None else ""
        log(f"  {seconds:.1f} s{spent}, {wrong} users wrong afterwards")
        if wrong:
            raise SystemExit(f"{label} left {wrong} users wrong")
    engine.dispose()

    log("")
    log(f"load average before: {load_before}")
    log(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for key in args.only:
        runs = ", ".join(f"{x:.1f}" for x in every[key])
        log(f"{approaches[key][0]}: {timings[key]:.1f} s (best of: {runs})")
    if "planning" in extra:
        log(f"library planning + enqueueing {users:,} parents: {extra['planning']:.2f} s")
        log(f"library worker peak RSS (max of 2 processes): {extra['rss_mb']:.0f} MB")
    if "c" in timings and "a" in timings:
        log(f"ratio (c)/(a) = {timings['c'] / timings['a']:.2f}  (goal <= 0.5)")
    if "c" in timings and "b" in timings:
        goal = "1.0" if users < 500_000 else "0.8"
        log(f"ratio (c)/(b) = {timings['c'] / timings['b']:.2f}  (goal <= {goal})")
    if "p" in timings and "b" in timings:
        log(f"ratio (p)/(b) = {timings['p'] / timings['b']:.2f}")


if __name__ == "__main__":
    main()
