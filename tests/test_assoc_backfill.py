"""Association-table counters beyond live maintenance: backfill, verify, status, autogenerate.

Rows go in through Core on a bare Connection (invisible to live maintenance),
so the counters start wrong; every check is against ``assoc_models.truth``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.migration import MigrationContext
from assoc_models import Base, User, assert_exact, cached, followers, post_tags, truth
from assoc_project import KEYS, assoc_project, seed_behind_the_listeners
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from alembic_counterfill import counter_cache, counters_of, progress, read
from alembic_counterfill.verify import verify


@pytest.fixture
def db(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


def test_counters_resolve_on_the_association_tables() -> None:
    by_key = {c.key: c for c in counters_of(Base)}
    assert sorted(by_key) == KEYS
    assert by_key["users.followers_count"].child_table is followers
    assert by_key["users.followers_count"].child_mapper is None
    assert by_key["tags.posts_count"].fk is post_tags.c.tag_id
    assert by_key["users.follower_weight"].summed is followers.c.weight


def test_enqueue_backfills_then_status_verify_and_reads(
    tmp_path: Path, db_url: str, db: sa.Engine
) -> None:
    seed_behind_the_listeners(db)
    with db.connect() as conn:
        assert cached(conn) != truth(conn)  # the seed really left them wrong
    project = assoc_project(tmp_path / "p", db_url)
    read.clear_cache()
    with Session(db) as s:  # pending: reads compute the truth from the association table
        user = s.get(User, 5)
        assert user is not None
        with db.connect() as conn:
            expected = truth(conn)[("users", 5)]
        assert read.counter_value(s, user, "followers_count") == expected[0]
        assert read.counter_value(s, user, "follower_weight") == expected[3]

    drifted = project.cli("verify", *KEYS)  # named: checked even while pending
    assert drifted.exit_code == 1, drifted.output

    result = project.cli("enqueue", "--wait")
    assert result.exit_code == 0, result.output
    assert_exact(db)
    status = json.loads(project.cli("status", "--json").output)
    assert {s["counter"]: s["state"] for s in status} == {k: progress.ACTIVE for k in KEYS}
    assert all(s["batches_done"] == s["batches_total"] > 0 for s in status)
    assert project.cli("verify").exit_code == 0

    read.clear_cache()
    with db.begin() as conn:  # corrupt one value behind our back: active reads trust the cache
        conn.execute(sa.update(User).where(User.id == 5).values(followers_count=4242))
    with Session(db) as s:
        user = s.get(User, 5)
        assert user is not None
        assert read.counter_value(s, user, "followers_count") == 4242
    report = project.cli("verify", "--json")
    assert report.exit_code == 1
    [d] = json.loads(report.stdout)
    assert (d["table"], d["id"], d["column"], d["cached"]) == ("users", 5, "followers_count", 4242)
    assert project.cli("verify", "--fix").exit_code == 0
    assert_exact(db)


def test_verify_api_fixes_every_association_counter(db: sa.Engine) -> None:
    seed_behind_the_listeners(db, users=60)
    found = verify(db, counters_of(Base), fix=True, batch_size=17)
    assert found and {d.column for d in found} >= {"followers_count", "tags_count"}
    assert_exact(db)


def test_live_writes_after_backfill_stay_exact(tmp_path: Path, db_url: str, db: sa.Engine) -> None:
    seed_behind_the_listeners(db, users=40)
    project = assoc_project(tmp_path / "p", db_url)
    assert project.cli("enqueue").exit_code == 0
    with Session(db) as s:
        a, b = s.get(User, 1), s.get(User, 2)
        assert a is not None and b is not None
        if b in a.following:
            a.following.remove(b)
        else:
            a.following.append(b)
        s.delete(s.get(User, 3))
        s.commit()
    assert_exact(db)


def _autogenerate(engine: sa.Engine, metadata: sa.MetaData) -> str:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            connection=conn,
            opts={
                "target_metadata": metadata,
                "autogenerate_plugins": ["alembic.autogenerate.*", "alembic_counterfill"],
            },
        )
        return render_python_code(produce_migrations(context, metadata).upgrade_ops)


def test_autogenerate_requests_a_backfill_for_a_counter_over_an_existing_table(
    db: sa.Engine,
) -> None:
    # The database has users and followers but no counter column yet.
    before = sa.MetaData()
    sa.Table("users", before, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table(
        "followers",
        before,
        sa.Column("follower_id", sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("followed_id", sa.ForeignKey("users.id"), primary_key=True),
    )
    before.create_all(db)
    code = _autogenerate(db, _followers_models())
    assert "op.add_column('users', sa.Column('followers_count'" in code
    assert "op.request_counter_backfill('users', 'followers_count')" in code


def _followers_models() -> sa.MetaData:
    class B(DeclarativeBase):
        pass

    table = sa.Table(
        "followers",
        B.metadata,
        sa.Column("follower_id", sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("followed_id", sa.ForeignKey("users.id"), primary_key=True),
    )

    class U(B):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        followers_count: Mapped[int] = counter_cache("followers.followed_id")
        following: Mapped[list[U]] = relationship(  # noqa: F821 - resolved by the registry
            secondary=table,
            primaryjoin=lambda: table.c.follower_id == U.id,
            secondaryjoin=lambda: table.c.followed_id == U.id,
        )

    B.registry.configure()
    return B.metadata
