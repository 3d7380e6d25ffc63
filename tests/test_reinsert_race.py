"""A stale delete or move meets a row deleted and re-inserted under its key by others.

Session B holds a copy of a row. Another transaction deletes the row; B's
flush deletes (or moves) its copy: the locking read finds nothing. A third
transaction C inserts a row under the same key. Had C committed before B's
DELETE or UPDATE statement, that statement would hit C's row while B counted
nothing: the counters would keep a row that no longer exists (or count a
moved row twice). Each test holds B just before that statement until C
committed (or 3 s passed), which forces the interleaving; each is judged by
an independent COUNT (``assert_exact``).

- Natural key (``Follow(4, 3)``): B locks the parents its copy names and
  reads the key again; C's delta waits for those locks, so C's row stays
  invisible to B's DELETE. PostgreSQL, and MariaDB at READ COMMITTED; at
  REPEATABLE READ the locking read's gap lock already makes C's INSERT wait.
- Surrogate key re-used naming other parents (``Post(id=1)`` by another
  author): no parent lock of B covers C, so B's statement matches C's row;
  B's flush is refused (``ReinsertedRowError``), rolled back whole, and C's
  row stays counted once. At REPEATABLE READ on MariaDB the gap lock makes C
  wait instead.
- Buffered counters, same key and parent: their writers take only shared
  parent locks, which B's lock does not exclude; refused as above.
- A row simply gone (no re-insert) keeps SQLAlchemy's warning.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import buffered_models as bm
import pytest
import sqlalchemy as sa
from social import Base, Follow, Post, User, assert_exact
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from alembic_counterfill import ReinsertedRowError

pytestmark = pytest.mark.timeout(60)

#: (database, isolation level of every session; None: the server's default).
CASES = [
    ("postgresql", None),
    ("mariadb", "READ COMMITTED"),
    ("mariadb", None),  # InnoDB's default, REPEATABLE READ
]


IDS = ["postgresql", "mariadb-read-committed", "mariadb-repeatable"]


def _engine(request: pytest.FixtureRequest, base: Any, user: Any) -> Iterator[sa.Engine]:
    database, isolation = request.param
    url = request.getfixturevalue("pg_url" if database == "postgresql" else "mariadb_url")
    kw = {"isolation_level": isolation} if isolation else {}
    eng = sa.create_engine(url, **kw)
    try:
        base.metadata.create_all(eng)
        with Session(eng) as s:
            s.add_all([user(id=i) for i in (1, 2, 3, 4)])
            s.commit()
        yield eng
    finally:
        eng.dispose()


@pytest.fixture(params=CASES, ids=IDS)
def engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    yield from _engine(request, Base, User)


@pytest.fixture(params=CASES, ids=IDS)
def buffered_engine(request: pytest.FixtureRequest, no_inline_folding: None) -> Iterator[sa.Engine]:
    yield from _engine(request, bm.Base, bm.User)


def _gap_locked(engine: sa.Engine) -> bool:
    """Whether B's locking read of a missing key makes C's INSERT wait (InnoDB, REPEATABLE READ)."""
    with engine.connect() as conn:
        level = conn.get_isolation_level()
    return engine.dialect.name in ("mysql", "mariadb") and level == "REPEATABLE READ"


def _race(
    engine: sa.Engine,
    b_conn: sa.Connection,
    b_write: Callable[[], None],
    c_write: Callable[[], None],
    prefix: str,
) -> tuple[BaseException | None, BaseException | None]:
    """Run B's write, hold it just before its ``prefix`` statement until C committed; errors."""
    at_statement, reinserted = threading.Event(), threading.Event()
    outcome: dict[str, BaseException | None] = {"b": None, "c": None}

    def hold(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if conn is b_conn and statement.lstrip().upper().startswith(prefix):
            at_statement.set()
            reinserted.wait(3)  # C waits for B's locks when they cover it: times out

    def b() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", sa.exc.SAWarning)  # 0 rows matched
                b_write()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["b"] = exc
        finally:
            at_statement.set()

    def c() -> None:
        try:
            c_write()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["c"] = exc
        finally:
            reinserted.set()

    sa.event.listen(engine, "before_cursor_execute", hold)
    threads = [threading.Thread(target=b, daemon=True)]
    try:
        threads[0].start()
        assert at_statement.wait(20), "B never reached its statement"
        threads.append(threading.Thread(target=c, daemon=True))
        threads[1].start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a racer hung"
    finally:
        reinserted.set()
        sa.event.remove(engine, "before_cursor_execute", hold)
    return outcome["b"], outcome["c"]


def _stale_copy(engine: sa.Engine, cls: type, key: Any) -> tuple[Session, Any]:
    """A session holding a copy of row ``key`` that another transaction then deletes."""
    stale = Session(engine, expire_on_commit=False)
    copy = stale.get(cls, key)
    assert copy is not None
    stale.commit()
    with Session(engine) as a:  # another transaction deletes the row
        a.delete(a.get(cls, key))
        a.commit()
    return stale, copy


def _count(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.text(sql)) or 0)


def test_a_stale_delete_never_removes_a_row_reinserted_under_its_key(engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(Follow(follower_id=4, followed_id=3))
        s.commit()
    stale, copy = _stale_copy(engine, Follow, (4, 3))
    try:
        b_conn = stale.connection()

        def b_write() -> None:
            stale.delete(copy)
            stale.commit()

        def c_write() -> None:
            with Session(engine) as s:
                s.add(Follow(follower_id=4, followed_id=3))
                s.commit()

        b_error, c_error = _race(engine, b_conn, b_write, c_write, "DELETE FROM FOLLOWS")
    finally:
        stale.close()
    assert (b_error, c_error) == (None, None)
    assert_exact(engine)
    # C's INSERT waited for B (parent locks, or InnoDB's gap lock): its row is there.
    assert _count(engine, "SELECT count(*) FROM follows") == 1


@pytest.mark.parametrize("write", ["delete", "move"])
def test_a_surrogate_key_reinserted_with_other_parents_is_refused_never_miscounted(
    engine: sa.Engine, write: str
) -> None:
    with Session(engine) as s:
        s.add(Post(id=1, author_id=1, published=True, likes=5))
        s.commit()
    stale, copy = _stale_copy(engine, Post, 1)
    try:
        b_conn = stale.connection()

        def b_write() -> None:
            if write == "delete":
                stale.delete(copy)
            else:
                copy.author_id = 3
            stale.commit()

        def c_write() -> None:  # the same id, another author
            with Session(engine) as s:
                s.add(Post(id=1, author_id=2, published=True, likes=7))
                s.commit()

        prefix = "DELETE FROM POSTS" if write == "delete" else "UPDATE POSTS"
        b_error, c_error = _race(engine, b_conn, b_write, c_write, prefix)
    finally:
        stale.close()
    assert c_error is None
    assert_exact(engine)
    if _gap_locked(engine):
        # C waited for B's gap lock: B's statement matched nothing (a move of
        # a vanished row is SQLAlchemy's StaleDataError, as without counters).
        assert b_error is None if write == "delete" else isinstance(b_error, StaleDataError)
    else:
        assert isinstance(b_error, ReinsertedRowError), b_error
        assert "re-inserted by another transaction" in str(b_error)
    # B wrote nothing: C's post stands as C wrote it.
    assert _count(engine, "SELECT count(*) FROM posts WHERE id = 1 AND author_id = 2") == 1


def test_a_row_simply_gone_keeps_sqlalchemys_warning(engine: sa.Engine) -> None:
    """Two stale copies deleted in one flush, one row gone: the ORM warns; no refusal, exact."""
    with Session(engine) as s:
        s.add_all([Post(id=1, author_id=1, likes=2), Post(id=2, author_id=2, likes=3)])
        s.commit()
    stale = Session(engine, expire_on_commit=False)
    try:
        copies = [stale.get(Post, 1), stale.get(Post, 2)]
        stale.commit()
        with Session(engine) as a:  # another transaction deletes post 1 only
            a.delete(a.get(Post, 1))
            a.commit()
        for copy in copies:
            stale.delete(copy)
        with pytest.warns(sa.exc.SAWarning, match="expected to delete 2 row"):
            stale.commit()  # one DELETE for both keys: the check counts per key
    finally:
        stale.close()
    assert _count(engine, "SELECT count(*) FROM posts") == 0
    assert_exact(engine)


def test_a_row_reinserted_under_buffered_counters_is_refused_never_miscounted(
    buffered_engine: sa.Engine,
) -> None:
    """Same key, same parent, buffered counters: their writers take no lock the flush's waits on.

    A buffered writer appends a delta row and takes only the shared lock of
    its foreign-key check (PostgreSQL ``KEY SHARE``, InnoDB ``S``), which the
    flush's parent lock does not exclude: C commits first, and B's DELETE is
    refused. Judged by column + pending deltas against ``COUNT``/``SUM``.
    """
    engine = buffered_engine
    with Session(engine) as s:
        s.add(bm.Post(id=1, author_id=1, published=True, likes=5))
        s.commit()
    stale, copy = _stale_copy(engine, bm.Post, 1)
    try:
        b_conn = stale.connection()

        def b_write() -> None:
            stale.delete(copy)
            stale.commit()

        def c_write() -> None:  # the same id and author
            with Session(engine) as s:
                s.add(bm.Post(id=1, author_id=1, published=True, likes=7))
                s.commit()

        b_error, c_error = _race(engine, b_conn, b_write, c_write, "DELETE FROM POSTS")
    finally:
        stale.close()
    assert c_error is None
    assert bm.drift(engine) == []
    if _gap_locked(engine):
        assert b_error is None
    else:
        assert isinstance(b_error, ReinsertedRowError), b_error
    assert _count(engine, "SELECT count(*) FROM posts WHERE id = 1 AND likes = 7") == 1
