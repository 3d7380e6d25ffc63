"""Helpers for backfill tests: seed drifted data, independent truth, a project dir, real workers.

The truth is computed here with hand-written SQL (COUNT/SUM over the child
tables), never with the library's builders, so tests judge the library
against something it did not produce.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import backfill_models as m
import sqlalchemy as sa
from click.testing import CliRunner, Result
from races import innodb_waiters, wait_until
from sqlalchemy.orm import Session
from typing_extensions import Self

from alembic_counterfill import progress
from alembic_counterfill.cli import cli

TESTS_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
USER_COUNTERS = [
    "users.followers_count",
    "users.following_count",
    "users.likes_total",
    "users.posts_count",
]

#: Independent truth: one row per user, cached and actual side by side.
TRUTH_SQL = sa.text(
    """
    SELECT u.id,
           u.followers_count, (SELECT count(*) FROM follows f WHERE f.followed_id = u.id),
           u.following_count, (SELECT count(*) FROM follows f WHERE f.follower_id = u.id),
           u.posts_count,
           (SELECT count(*) FROM posts p WHERE p.author_id = u.id AND p.published),
           u.likes_total, (SELECT coalesce(sum(p.likes), 0) FROM posts p WHERE p.author_id = u.id)
    FROM users u ORDER BY u.id
    """
)
ORG_TRUTH_SQL = sa.text(
    "SELECT o.id, o.members_count, (SELECT count(*) FROM members x WHERE x.org_id = o.id) "
    "FROM orgs o"
)
COLUMNS = ["followers_count", "following_count", "posts_count", "likes_total"]


def drift(engine: sa.Engine) -> list[tuple[Any, str, int, int]]:
    """Every (id, column, cached, actual) where a users/orgs counter differs from the truth."""
    out = []
    with engine.connect() as conn:
        for row in conn.execute(TRUTH_SQL):
            for i, column in enumerate(COLUMNS):
                cached, actual = row[1 + 2 * i], row[2 + 2 * i]
                if cached != actual:
                    out.append((row[0], column, cached, int(actual)))
        if sa.inspect(conn).has_table("orgs"):
            for oid, cached, actual in conn.execute(ORG_TRUTH_SQL):
                if cached != actual:
                    out.append((oid, "members_count", cached, actual))
    return out


def seed(
    engine: sa.Engine,
    users: int = 300,
    follows: int = 5,
    posts: int = 3,
    orgs: int = 0,
    members: int = 4,
    rng_seed: int = 7,
) -> None:
    """Create the tables and fill them behind the listeners' back, with wrong counters.

    Rows go in through Core on a Connection (invisible to live maintenance),
    counters are scrambled, and every counter is recorded as pending, as a
    migration adding them would leave it.
    """
    rng = random.Random(rng_seed)
    m.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        if users:
            conn.execute(
                sa.insert(m.User),
                [
                    {"id": i, "name": f"u{i}", **{c: rng.randrange(3) for c in COLUMNS}}
                    for i in range(1, users + 1)
                ],
            )
        rows = [
            {"follower_id": i, "followed_id": rng.randrange(1, users + 1)}
            for i in range(1, users + 1)
            for _ in range(rng.randrange(follows * 2 + 1))
        ]
        if rows:
            conn.execute(sa.insert(m.Follow), rows)
        rows = [
            {
                "author_id": rng.randrange(1, users + 1),
                "published": rng.random() < 0.6,
                "likes": rng.randrange(10),
            }
            for _ in range(users * posts)
        ]
        if rows:
            conn.execute(sa.insert(m.Post), rows)
        org_ids = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(orgs)]
        if org_ids:
            conn.execute(
                sa.insert(m.Org), [{"id": o, "members_count": rng.randrange(3)} for o in org_ids]
            )
            conn.execute(
                sa.insert(m.Member),
                [{"org_id": rng.choice(org_ids)} for _ in range(orgs * members)],
            )
        progress.ensure_tables(conn)
        keys = USER_COUNTERS + (["orgs.members_count"] if orgs else [])
        for key in keys:
            table, column = key.split(".")
            for stmt in progress.request_statements(key, table, column, None):
                conn.execute(stmt)


def counters_by_key() -> dict[str, Any]:
    """The test models' counters, by key."""
    from alembic_counterfill import counters_of

    return {c.key: c for c in counters_of(m.Base)}


def states(engine: sa.Engine) -> dict[str, str]:
    """Recorded state of each counter, by key."""
    with engine.connect() as conn:
        return {k: r["state"] for k, r in progress.counter_rows(conn).items()}


def batch_rows(engine: sa.Engine) -> list[Any]:
    """Every batch row."""
    with engine.connect() as conn:
        return list(conn.execute(sa.select(progress.batches_table)).mappings())


def run_rows(engine: sa.Engine) -> list[Any]:
    """Every run row."""
    with engine.connect() as conn:
        return list(conn.execute(sa.select(progress.runs_table).order_by("id")).mappings())


#: Environment variables that change `enqueue`; tests start with none set.
ENV_DEFAULTS = (
    "COUNTERFILL_BROKER_URL",
    "COUNTERFILL_BATCH_SIZE",
    "COUNTERFILL_WAIT",
    "COUNTERFILL_VERIFY",
    "COUNTERFILL_MAX_ROWS_PER_SECOND",
)


@dataclass
class Project:
    """A directory with an alembic.ini whose ``[counterfill]`` section points at the test models."""

    path: Path
    database_url: str
    broker_url: str | None = None
    queue: str = field(default_factory=lambda: f"cf_{uuid.uuid4().hex[:10]}")
    batch_size: int = 50
    metadata: str = "backfill_models:Base"

    def __post_init__(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lines = [
            "[alembic]",
            "script_location = migrations",
            f"sqlalchemy.url = {self.database_url.replace('%', '%%')}",
            "",
            "[counterfill]",
            f"metadata = {self.metadata}",
            f"queue = {self.queue}",
            f"batch_size = {self.batch_size}",
        ]
        if self.broker_url:
            lines.append(f"broker_url = {self.broker_url}")
        (self.path / "alembic.ini").write_text("\n".join(lines) + "\n")

    @property
    def ini(self) -> str:
        """Path of the project's alembic.ini."""
        return str(self.path / "alembic.ini")

    def env(self) -> dict[str, str]:
        """Environment for subprocesses: tests/ importable, no stray overrides."""
        env = {k: v for k, v in os.environ.items() if k not in ENV_DEFAULTS}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
        env["ALEMBIC_CONFIG"] = self.ini
        return env

    def cli(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        """Run ``alembic-counterfill -c <ini> ARGS`` in this process (click's test runner)."""
        base: dict[str, str | None] = dict.fromkeys(ENV_DEFAULTS)
        base.update(env or {})
        return CliRunner().invoke(cli, ["-c", self.ini, *args], env=base)

    def worker(self, processes: int = 1, threads: int = 2, **env: str) -> Worker:
        """Start a real ``dramatiq alembic_counterfill.worker`` on this project (extra env)."""
        return Worker(self, processes, threads, env).start()


class Worker:
    """A ``dramatiq alembic_counterfill.worker`` subprocess in its own process group."""

    def __init__(
        self, project: Project, processes: int, threads: int, env: dict[str, str] | None = None
    ) -> None:
        self.project = project
        self.extra_env = env or {}
        self.args = [
            str(BIN / "dramatiq"),
            "alembic_counterfill.worker",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
        ]
        self.log_path = project.path / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Worker:
        """Start and wait until every worker process says it is ready."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.project.path,
                env={**self.project.env(), **self.extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        processes = int(self.args[3])
        while self.log.count("Worker process is ready for action.") < processes:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker did not start:\n{self.log}")
            time.sleep(0.05)
        return self

    @property
    def log(self) -> str:
        """Everything the worker logged so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole process group (master and worker processes) at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM to the master, which stops its workers), kill if stuck."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    return wait_until(predicate, what, timeout)


#: Backend pids of this process's lock holders: other test runs share the server.
_HOLDERS: set[int] = set()


def lock_users(engine: sa.Engine, ids: Sequence[int]) -> sa.Connection:
    """Hold ``FOR UPDATE`` locks on some users in an open transaction (caller rolls back)."""
    conn = engine.connect()
    stmt = sa.text("SELECT id FROM users WHERE id IN :ids FOR UPDATE").bindparams(
        sa.bindparam("ids", expanding=True)
    )
    conn.execute(stmt, {"ids": list(ids)})
    pid = "connection_id()" if is_mariadb(engine) else "pg_backend_pid()"
    _HOLDERS.add(conn.execute(sa.text(f"SELECT {pid}")).scalar_one())
    return conn


def is_mariadb(engine: sa.Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def blocked_backends(engine: sa.Engine) -> list[int]:
    """PIDs of worker connections waiting, directly or not, on a lock this test holds.

    Only those: workers of other test runs on the same server wait on locks too,
    and a test must never act on (or terminate) their connections.
    """
    if is_mariadb(engine):  # sessions waiting on locks of this test's own database only
        with engine.connect() as conn:
            me = conn.execute(sa.text("SELECT connection_id()")).scalar_one()
            return [x for x in innodb_waiters(conn) if x != me]
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity "
                "WHERE application_name = 'counterfill-worker' AND wait_event_type = 'Lock'"
            )
        ).all()
    ours, found = set(_HOLDERS), []
    changed = True
    while changed:  # follow chains: a worker waiting on a worker waiting on our holder
        changed = False
        for pid, blockers in rows:
            if pid not in ours and ours.intersection(blockers or ()):
                ours.add(pid)
                found.append(pid)
                changed = True
    return sorted(found)


def wait_blocked_workers(engine: sa.Engine, n: int, *workers: Worker) -> list[int]:
    """Wait until ``n`` worker sessions wait on this test's locks; return their ids.

    On timeout the error shows what the server's sessions were doing and the
    workers' last log lines, so a missed wait can be told from a worker that
    failed or finished instead.
    """
    try:
        return wait_for(
            lambda: _exactly(blocked_backends(engine), n), what=f"{n} blocked batch(es)"
        )
    except AssertionError as exc:
        logs = "\n".join(w.log[-3000:] for w in workers)
        raise AssertionError(f"{exc}; sessions: {sessions(engine)}\n{logs}") from None


def _exactly(found: list[int], n: int) -> list[int] | None:
    return found if len(found) == n else None


def sessions(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """(id, state, statement) of the sessions on this test's database or workers (diagnostics)."""
    with engine.connect() as conn:
        if is_mariadb(engine):
            waiting = set(innodb_waiters(conn))
            rows = conn.execute(
                sa.text(
                    "SELECT id, command, left(info, 120) FROM information_schema.processlist "
                    "WHERE db = database() AND id <> connection_id()"
                )
            )
            return [(i, "LOCK WAIT" if i in waiting else c, q) for i, c, q in rows]
        query = (
            "SELECT pid, wait_event_type, left(query, 120) FROM pg_stat_activity "
            "WHERE application_name = 'counterfill-worker'"
        )
        return [tuple(r) for r in conn.execute(sa.text(query))]


def terminate(engine: sa.Engine, pid: int) -> None:
    """End another session from the server side, as an operator or a failover would."""
    with engine.connect() as conn:
        if is_mariadb(engine):
            conn.execute(sa.text("KILL :pid"), {"pid": pid})
        else:
            assert conn.execute(sa.select(sa.func.pg_terminate_backend(pid))).scalar()


#: What a worker's log says when the server ended its connection.
TERMINATED = {"postgresql": "terminating connection", "mysql": "Lost connection"}


def make_read_only(engine: sa.Engine, user_id: int) -> None:
    """Make every UPDATE of user ``user_id`` fail (a trigger named ``no_<id>``)."""
    name, message = f"no_{int(user_id)}", f"user {int(user_id)} is read-only"
    with engine.begin() as conn:
        if is_mariadb(engine):
            conn.execute(
                sa.text(
                    f"CREATE TRIGGER {name} BEFORE UPDATE ON users FOR EACH ROW "
                    f"BEGIN IF NEW.id = {int(user_id)} THEN "
                    f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'; END IF; END"
                )
            )
            return
        conn.execute(
            sa.text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"RAISE EXCEPTION '{message}'; END $$;"
                f"CREATE TRIGGER {name} BEFORE UPDATE ON users FOR EACH ROW "
                f"WHEN (NEW.id = {int(user_id)}) EXECUTE FUNCTION {name}()"
            )
        )


def make_writable(engine: sa.Engine, user_id: int) -> None:
    """Drop the trigger of :func:`make_read_only`."""
    name = f"no_{int(user_id)}"
    with engine.begin() as conn:
        on = "" if is_mariadb(engine) else " ON users"
        conn.execute(sa.text(f"DROP TRIGGER {name}{on}"))


class WriterThreads:
    """Writer threads running ``_loop(index)`` from ``with`` entry until exit (then joined).

    :param join_timeout: with a bound, the threads are daemons and a thread
        still running after it is recorded in ``errors`` (a hung writer fails
        the test instead of hanging the suite).
    """

    def __init__(
        self, engine: sa.Engine, threads: int, *, join_timeout: float | None = None
    ) -> None:
        self.engine = engine
        self.count = threads
        self.stop = threading.Event()
        self.writes = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.join_timeout = join_timeout
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=join_timeout is not None)
            for i in range(threads)
        ]

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.join_timeout)
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            self.errors.append(f"threads still running after {self.join_timeout}s: {alive}")

    def _loop(self, index: int) -> None:
        raise NotImplementedError


class Writers(WriterThreads):
    """Six threads of ORM writes: follow/unfollow, create/move posts, flip published, likes."""

    def __init__(self, engine: sa.Engine, users: int, threads: int = 6) -> None:
        super().__init__(engine, threads)
        self.users = users
        self.counting = threading.Event()
        self.writes_while_counting = 0

    def _loop(self, index: int) -> None:
        count = self.count
        rng = random.Random(index)
        while not self.stop.is_set():
            try:
                with Session(self.engine) as session:
                    self._one(session, rng, index, count)
                    session.commit()
                with self.lock:
                    self.writes += 1
                    if self.counting.is_set():
                        self.writes_while_counting += 1
            except Exception as exc:  # every error fails the test, deadlocks included
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _one(self, session: Session, rng: random.Random, index: int, count: int) -> None:
        user = rng.randrange(1, self.users + 1)
        other = rng.randrange(1, self.users + 1)
        op = rng.randrange(6)
        # Each thread edits only its own children (id % count == index), so threads
        # never fight over a child row; they all hit the same parents.
        mine_f = (m.Follow.id % count) == index
        mine_p = (m.Post.id % count) == index
        if op == 0:
            session.add(m.Follow(follower_id=user, followed_id=other))
        elif op == 1:
            follow = session.scalars(
                sa.select(m.Follow).where(mine_f, m.Follow.followed_id >= other).limit(1)
            ).first()
            if follow is not None:
                session.delete(follow)
        elif op == 2:
            session.add(
                m.Post(author_id=user, published=rng.random() < 0.5, likes=rng.randrange(9))
            )
        else:
            post = session.scalars(
                sa.select(m.Post).where(mine_p, m.Post.author_id >= other).limit(1)
            ).first()
            if post is None:
                return
            if op == 3:
                post.author_id = user
            elif op == 4:
                post.published = not post.published
            else:
                post.likes = rng.randrange(20)
