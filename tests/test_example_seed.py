"""The example's data generator: deterministic, bulk, and blind to the ORM listeners."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from test_example_demo import counter_mismatches

from example_project.errors import ExampleError
from example_project.models import Base, Follow, Post, User
from example_project.seed import generate, seed

ORDER = {"users": "id", "follows": "follower_id, followed_id", "posts": "id"}


def dump(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the three tables, in key order."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            md = sa.MetaData()
            md.reflect(conn, only=list(ORDER))
            return {
                name: [tuple(r) for r in conn.execute(sa.select(t).order_by(*t.primary_key))]
                for name, t in md.tables.items()
            }
    finally:
        engine.dispose()


def load(url: str, users: int, seed_value: int) -> None:
    engine = sa.create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            seed(conn, users, seed_value, progress=False)
    finally:
        engine.dispose()


def test_same_seed_same_rows_other_seed_other_rows(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / name}.db" for name in ("a", "b", "c")]
    load(urls[0], 150, seed_value=7)
    load(urls[1], 150, seed_value=7)
    load(urls[2], 150, seed_value=8)
    first, again, other = (dump(u) for u in urls)
    assert first == again
    assert len(first["users"]) == 150 and first["follows"] and first["posts"]
    assert first["follows"] != other["follows"]


def test_generated_rows_are_plausible() -> None:
    rows = list(generate(500, seed=1))
    follows = [r for t, r in rows if t == "follows"]
    posts = [r for t, r in rows if t == "posts"]
    assert [r for t, r in rows if t == "users"][:2] == [(1, "user0000001"), (2, "user0000002")]
    assert all(a != b for a, b in follows), "nobody follows themselves"
    assert len(set(follows)) == len(follows), "a pair is followed once"
    assert 8 * 500 < len(follows) < 12 * 500
    assert 4 * 500 < len(posts) < 6 * 500
    published = sum(1 for p in posts if p[3]) / len(posts)
    assert 0.7 < published < 0.9
    followers: dict[int, int] = {}
    for _, followed in follows:
        followers[followed] = followers.get(followed, 0) + 1
    assert max(followers.values()) > 20 * (len(follows) / 500), "followers are skewed"


def test_seed_bypasses_the_listeners_so_counters_go_stale(sqlite_url: str) -> None:
    load(sqlite_url, 100, seed_value=3)
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        cached = conn.execute(
            sa.select(sa.func.sum(User.followers_count + User.following_count + User.posts_count))
        ).scalar()
    assert cached == 0
    assert len(counter_mismatches(engine)) > 50
    engine.dispose()


def test_a_server_loads_the_same_rows_as_sqlite(server_url: str, sqlite_url: str) -> None:
    """PostgreSQL through COPY, MariaDB through executemany."""
    load(sqlite_url, 120, seed_value=5)
    load(server_url, 120, seed_value=5)
    assert dump(server_url) == dump(sqlite_url)
    # The keys' sequences (AUTO_INCREMENT) moved past the seeded ids: the app's next ORM
    # insert works.
    engine = sa.create_engine(server_url)
    with Session(engine) as session:
        user = User(username="newcomer")
        session.add(user)
        session.flush()
        session.add_all([Post(author_id=user.id, title="hello", published=True)])
        session.add(Follow(follower_id=user.id, followed_id=1))
        session.commit()
        assert user.id == 121
        assert (user.posts_count, user.following_count) == (1, 1)
    engine.dispose()


def test_seed_refuses_a_database_that_already_has_rows(sqlite_url: str) -> None:
    load(sqlite_url, 10, seed_value=1)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn, pytest.raises(ExampleError, match="already has rows"):
        seed(conn, 10, 1, progress=False)
    engine.dispose()


def test_seed_cli_reports_an_unmigrated_database_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "example_project", "seed", "--database-url", url, "--users", "5"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "error: cannot read table 'users'" in proc.stderr
    assert "upgrade 0001" in proc.stderr
    assert "Traceback" not in proc.stderr
