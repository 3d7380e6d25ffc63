"""alembic_counterfill.testing: the drift assertion reports table, id, column, cached and actual."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from social import Base, Follow, Post, User
from sqlalchemy.orm import Session

from alembic_counterfill.testing import assert_counters_consistent, find_drift


def test_assert_counters_consistent_lists_each_drift(engine: sa.Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=1), User(id=2), User(id=3, referrer_id=1)])
        s.flush()  # Follow has no relationship(): the ORM cannot order it after users
        s.add_all([Follow(follower_id=1, followed_id=2), Post(author_id=2, likes=4)])
        s.commit()
    assert_counters_consistent(engine, Base)  # exact after ORM writes
    with engine.begin() as conn:  # raw SQL is invisible to the library: drift on purpose
        conn.execute(sa.text("UPDATE users SET followers_count = 7, likes_total = 1 WHERE id = 2"))
        conn.execute(sa.text("UPDATE users SET referrals_count = 0 WHERE id = 1"))
    with pytest.raises(AssertionError) as err:
        assert_counters_consistent(engine, Base)
    msg = str(err.value)
    assert msg.splitlines()[0] == "3 counter value(s) drifted:"
    assert "users id=2 followers_count: cached 7, actual 1" in msg
    assert "users id=2 likes_total: cached 1, actual 4" in msg
    assert "users id=1 referrals_count: cached 0, actual 1" in msg
    with Session(engine) as s:
        drift = find_drift(s, Base.metadata)
    assert [(d[0], d[1], d[2]) for d in drift] == [
        ("users", 1, "referrals_count"),
        ("users", 2, "followers_count"),
        ("users", 2, "likes_total"),
    ]
