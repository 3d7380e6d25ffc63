"""A stale delete meets a row deleted and re-inserted under its key by others (PostgreSQL).

Session B holds a copy of ``Follow(4, 3)``. Another transaction deletes the
row; B's flush deletes its copy: the locking read finds nothing. A third
transaction C inserts ``Follow(4, 3)`` again. Had C committed before B's
DELETE statement, that DELETE would remove C's row while B counted nothing:
the counters would keep a follow that no longer exists. B's flush therefore
locks the parents its copy names and reads the key again; C's delta waits
for those locks, so C's row stays invisible to B's DELETE. The test holds
B just before its DELETE until C committed (or 3 s passed), which forces the
interleaving that drifted before the fix; judged by an independent COUNT.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import pytest
import sqlalchemy as sa
from social import Base, Follow, User, assert_exact
from sqlalchemy.orm import Session

pytestmark = pytest.mark.timeout(60)


def test_a_stale_delete_never_removes_a_row_reinserted_under_its_key(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    errors: list[BaseException] = []
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([User(id=3), User(id=4)])
            s.commit()
            s.add(Follow(follower_id=4, followed_id=3))
            s.commit()
        stale = Session(engine, expire_on_commit=False)
        copy = stale.get(Follow, (4, 3))
        stale.commit()
        with Session(engine) as a:  # another transaction deletes the row
            a.delete(a.get(Follow, (4, 3)))
            a.commit()

        b_conn = stale.connection()
        at_delete, reinserted = threading.Event(), threading.Event()

        def hold(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if conn is b_conn and statement.lstrip().upper().startswith("DELETE FROM FOLLOWS"):
                at_delete.set()
                reinserted.wait(3)  # with the fix C waits for B's parent locks: times out

        def b() -> None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", sa.exc.SAWarning)  # 0 rows matched
                    stale.delete(copy)
                    stale.commit()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                at_delete.set()

        def c() -> None:
            try:
                with Session(engine) as s:
                    s.add(Follow(follower_id=4, followed_id=3))
                    s.commit()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
            finally:
                reinserted.set()

        sa.event.listen(engine, "before_cursor_execute", hold)
        threads = [threading.Thread(target=b, daemon=True)]
        try:
            threads[0].start()
            assert at_delete.wait(20), "B never reached its DELETE"
            threads.append(threading.Thread(target=c, daemon=True))
            threads[1].start()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads), "a racer hung"
        finally:
            reinserted.set()
            sa.event.remove(engine, "before_cursor_execute", hold)
            stale.close()
        assert errors == []
        with engine.connect() as conn:
            follows = conn.scalar(sa.text("SELECT count(*) FROM follows"))
        assert follows in (0, 1)
        assert_exact(engine)
    finally:
        engine.dispose()
