"""The mysqlclient driver (``mysql+mysqldb``, extra ``[mysqlclient]``) on MariaDB: same guarantees.

The rest of the suite drives MariaDB through pymysql; this runs the live
protocols (flush, bulk statements) and a verify repair through mysqlclient,
judged against the test's own COUNT/SUM.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from social import Base, Follow, Post, User, assert_exact
from sqlalchemy.orm import Session

from alembic_counterfill.counters import counters_of
from alembic_counterfill.verify import verify

pytest.importorskip("MySQLdb", reason="mysqlclient is not installed (pip install '.[mysqlclient]')")


@pytest.fixture
def db(mariadb_url: str) -> Iterator[sa.Engine]:
    url = sa.make_url(mariadb_url).set(drivername="mysql+mysqldb")
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_flush_bulk_and_verify_through_mysqldb(db: sa.Engine) -> None:
    with Session(db) as s:
        s.add_all([User(id=i) for i in range(1, 6)])
        s.commit()
        s.add_all([Follow(follower_id=1, followed_id=b) for b in (2, 3, 4)])
        s.add_all(
            [Post(id=i, author_id=1 + i % 5, likes=i, published=i % 2 == 0) for i in range(1, 11)]
        )
        s.commit()
        post = s.get(Post, 3)
        assert post is not None
        post.author_id = 5  # an FK move
        s.delete(s.get(Follow, (1, 3)))
        s.commit()
    assert_exact(db)
    with Session(db) as s:
        s.execute(sa.insert(Post), [{"author_id": 2, "likes": 4}, {"author_id": 4, "likes": 1}])
        s.execute(sa.update(Post).where(Post.author_id == 1).values(author_id=3))
        s.execute(sa.delete(Post).where(Post.likes >= 8))
        s.commit()
    assert_exact(db)
    with db.begin() as conn:  # drift behind the library's back, then repair it
        conn.execute(sa.update(User).where(User.id == 2).values(followers_count=99))
    found = verify(db, counters_of(User), fix=True)
    assert [(d.id, d.column, d.cached) for d in found] == [(2, "followers_count", 99)]
    assert_exact(db)
