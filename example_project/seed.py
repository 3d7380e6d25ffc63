"""Data generator: load users, follows and posts with bulk inserts that bypass the ORM.

This is the situation counter caches go stale in: a bulk load (the seed's
``insert_all``, a data import, raw SQL) writes child rows without passing
through the ORM flush, so no live delta is applied. The generator writes with
Core ``insert()`` executemany on SQLite and ``COPY`` on PostgreSQL, through
lightweight ``table()`` constructs that name only the base schema's columns,
so it works before and after the counter migration.

Rows depend only on ``(users, seed)``: ``random.Random(seed)`` drives every choice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .errors import ExampleError
from .progress import ProgressBar

users_t = sa.table("users", sa.column("id"), sa.column("username"))
follows_t = sa.table("follows", sa.column("follower_id"), sa.column("followed_id"))
posts_t = sa.table(
    "posts", sa.column("id"), sa.column("author_id"), sa.column("title"), sa.column("published")
)
TABLES = (users_t, follows_t, posts_t)

#: Rows per executemany / COPY flush.
CHUNK = 20_000
#: Follows per user are uniform on [0, 2 * MEAN_FOLLOWS]; posts likewise.
MEAN_FOLLOWS = 10
MEAN_POSTS = 5
#: Share of posts that are published (only those count in ``posts_count``).
PUBLISHED = 0.8
#: Followed users are drawn as ``n * random() ** SKEW``: a few users get most followers.
SKEW = 3


@dataclass
class SeedResult:
    """What one generator run loaded, and how long it took."""

    users: int
    follows: int
    posts: int
    seconds: float

    @property
    def rows(self) -> int:
        """All rows written."""
        return self.users + self.follows + self.posts

    def summary(self) -> str:
        """One line for the console."""
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return (
            f"seeded {self.users:,} users, {self.follows:,} follows, {self.posts:,} posts "
            f"({self.rows:,} rows) in {self.seconds:.1f} s, {rate:,.0f} rows/s"
        )


def generate(users: int, seed: int) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Yield ``(table name, row)`` for every row, users first, then each user's follows and posts.

    Follows never repeat a pair and never follow oneself; followed users are
    skewed towards low ids, so user 1 has thousands of followers at 100,000 users.
    """
    rng = random.Random(seed)
    for uid in range(1, users + 1):
        yield "users", (uid, f"user{uid:07d}")
    post_id = 0
    for uid in range(1, users + 1):
        wanted = min(rng.randint(0, 2 * MEAN_FOLLOWS), users - 1)
        followed: set[int] = set()
        # Bounded: a user with few candidates (tiny N) must not loop forever.
        for _ in range(wanted * 4):
            if len(followed) == wanted:
                break
            target = 1 + int(users * rng.random() ** SKEW)
            if target != uid:
                followed.add(target)
        for target in sorted(followed):
            yield "follows", (uid, target)
        for _ in range(rng.randint(0, 2 * MEAN_POSTS)):
            post_id += 1
            published = rng.random() < PUBLISHED
            yield "posts", (post_id, uid, f"Post {post_id} by user{uid:07d}", published)


def _check_empty(connection: Connection) -> None:
    for table in TABLES:
        try:
            found = connection.execute(sa.select(sa.literal(1)).select_from(table).limit(1)).first()
        except sa.exc.DBAPIError as exc:
            raise ExampleError(
                f"cannot read table {table.name!r} ({type(exc.orig).__name__}); "
                "migrate the database first: alembic -c <alembic.ini> upgrade 0001"
            ) from None
        if found is not None:
            raise ExampleError(
                f"table {table.name!r} already has rows; seed an empty database "
                "(delete the SQLite file, or alembic downgrade base && alembic upgrade 0001)"
            )


class _Writer:
    """Buffer rows per table and write them in chunks: executemany, or COPY on PostgreSQL."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.copy = connection.dialect.name == "postgresql"
        self.buffers: dict[str, list[tuple[Any, ...]]] = {t.name: [] for t in TABLES}
        self.by_name = {t.name: t for t in TABLES}
        self.counts = dict.fromkeys(self.buffers, 0)

    def add(self, table: str, row: tuple[Any, ...]) -> bool:
        """Buffer one row; return whether a chunk was flushed."""
        buf = self.buffers[table]
        buf.append(row)
        self.counts[table] += 1
        if len(buf) >= CHUNK:
            self.flush(table)
            return True
        return False

    def flush(self, name: str) -> None:
        """Write the buffered rows of table ``name``."""
        rows = self.buffers[name]
        if not rows:
            return
        table = self.by_name[name]
        if self.copy:
            self._copy(table, rows)
        elif self.connection.dialect.positional:
            # The compiled Core insert (SQLAlchemy quotes the names), fed plain
            # tuples: a third faster than dicts through Connection.execute.
            statement = str(sa.insert(table).compile(dialect=self.connection.dialect))
            self.connection.exec_driver_sql(statement, rows)
        else:
            keys = [c.name for c in table.columns]
            params = [dict(zip(keys, r, strict=True)) for r in rows]
            self.connection.execute(sa.insert(table), params)
        rows.clear()

    def _copy(self, table: sa.TableClause, rows: list[tuple[Any, ...]]) -> None:
        from psycopg import sql

        # psycopg composes identifiers itself: names never reach SQL as text.
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table.name),
            sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns),
        )
        raw = self.connection.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)


def _after_load(connection: Connection) -> None:
    """Bring the database up to date with what was loaded behind its back."""
    if connection.dialect.name == "sqlite":
        # Fresh statistics, so the COUNT(*) profile query gets its best plan
        # (the SQLite file holds only the app's tables).
        connection.execute(sa.text("ANALYZE"))
        return
    if connection.dialect.name != "postgresql":
        # MariaDB/MySQL: InnoDB recomputes a table's statistics itself once a
        # tenth of it changed, and AUTO_INCREMENT follows explicit ids (a bare
        # ANALYZE is a syntax error there, and ANALYZE TABLE commits).
        return
    # COPY with explicit ids leaves the sequences behind; the ORM's next
    # insert would collide with a seeded id.
    for table in (users_t, posts_t):
        seq = sa.func.pg_get_serial_sequence(table.name, "id")
        top = sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0) + 1).scalar_subquery()
        connection.execute(sa.select(sa.func.setval(seq, top, False)))
    from psycopg import sql

    # Only our tables: a bare ANALYZE would visit every table of the database.
    names = sql.SQL(", ").join(sql.Identifier(t.name) for t in TABLES)
    analyze = sql.SQL("ANALYZE {}").format(names)
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor:
        cursor.execute(analyze)


def seed(connection: Connection, users: int, seed: int = 42, progress: bool = True) -> SeedResult:
    """Load ``users`` users and their follows and posts into the empty tables on ``connection``.

    The caller commits. Raises :class:`ExampleError` if the tables are missing or not empty.
    """
    if users < 1:
        raise ExampleError(f"--users must be at least 1, got {users}")
    _check_empty(connection)
    started = time.perf_counter()
    writer = _Writer(connection)
    bar = ProgressBar("seed", users, "users") if progress else None
    users_done = 0
    for table, row in generate(users, seed):
        if table == "users":
            writer.add(table, row)
            continue
        if users_done == 0:
            # Children reference users: every user must be written before the first child.
            writer.flush("users")
        flushed = writer.add(table, row)
        users_done = row[0] if table == "follows" else row[1]
        if bar is not None and flushed:
            bar.update(users_done, sum(writer.counts.values()))
    for t in TABLES:
        writer.flush(t.name)
    _after_load(connection)
    if bar is not None:
        bar.update(users, sum(writer.counts.values()))
        bar.finish()
    c = writer.counts
    return SeedResult(
        users=c["users"],
        follows=c["follows"],
        posts=c["posts"],
        seconds=time.perf_counter() - started,
    )
