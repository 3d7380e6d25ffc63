"""Helpers for the association-table backfill tests: a seed behind the listeners, a project."""

from __future__ import annotations

import random
from pathlib import Path

import sqlalchemy as sa
from assoc_models import Base, Post, Tag, User, followers, post_tags
from backfill_project import Project

from alembic_counterfill import progress

KEYS = [
    "posts.tags_count",
    "tags.posts_count",
    "users.accepted_followers",
    "users.follower_weight",
    "users.followers_count",
    "users.following_count",
]


def seed_behind_the_listeners(engine: sa.Engine, users: int = 120, rng_seed: int = 3) -> None:
    """Create the tables and fill them through Core (not seen), with scrambled counters."""
    rng = random.Random(rng_seed)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(User.__table__),
            [{"id": i, "name": "u", "followers_count": rng.randrange(4)} for i in range(1, users)],
        )
        pairs = {(rng.randrange(1, users), rng.randrange(1, users)) for _ in range(users * 4)}
        conn.execute(
            sa.insert(followers),
            [
                {"follower_id": a, "followed_id": b, "accepted": rng.random() < 0.7, "weight": w}
                for (a, b), w in zip(sorted(pairs), range(len(pairs)), strict=False)
            ],
        )
        conn.execute(sa.insert(Post.__table__), [{"id": i} for i in range(1, 40)])
        conn.execute(sa.insert(Tag.__table__), [{"id": i} for i in range(1, 10)])
        conn.execute(
            sa.insert(post_tags),
            [{"post_id": rng.randrange(1, 40), "tag_id": rng.randrange(1, 10)} for _ in range(150)],
        )
        progress.ensure_tables(conn)
        for key in KEYS:
            table, column = key.split(".")
            for stmt in progress.request_statements(key, table, column, None):
                conn.execute(stmt)


def assoc_project(path: Path, url: str, broker_url: str | None = None) -> Project:
    project = Project(path, url, broker_url=broker_url, batch_size=25)
    ini = Path(project.ini)
    ini.write_text(ini.read_text().replace("backfill_models:Base", "assoc_models:Base"))
    return project
