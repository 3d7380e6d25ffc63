"""A counter's definition is versioned like a column, through real ``alembic init`` projects.

One project per database (SQLite in batch mode, PostgreSQL) walks the story
once (module-scoped: every step is a subprocess of the real ``alembic``
executable): backfill three counters, change ``where=``, change ``sum=`` and a
target, remove a counter mid-run, add it back, downgrade, and mistype a
target. Tests then assert one behaviour each on what each step produced;
exactness is judged with hand-written SQL for the definition in force.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import REDIS_BASE, RUN_ID, delete_namespace, own_database
from projects import Project, body, clean_env, init_template, make_project

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    followers_count: Mapped[int] = counter_cache({followers!r})
    posts_count: Mapped[int] = counter_cache({posts_target!r}, where=lambda: {posts_where})
{likes}

class Follow(Base):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    published: Mapped[bool] = mapped_column(default=False)
    likes: Mapped[int] = mapped_column(default=0)
    shares: Mapped[int] = mapped_column(default=0)
"""

LIKES = '    likes_total: Mapped[int] = counter_cache("Post.author_id", sum={summed!r})\n'
PUBLISHED = "Post.published.is_(True)"
POPULAR = "sa.and_(Post.published.is_(True), Post.likes >= 5)"

#: Independent truth per definition: (column, SQL giving the right value per user id).
FOLLOWERS_IN = "(SELECT count(*) FROM follows f WHERE f.followed_id = u.id)"
FOLLOWERS_OUT = "(SELECT count(*) FROM follows f WHERE f.follower_id = u.id)"
PUBLISHED_SQL = "(SELECT count(*) FROM posts p WHERE p.author_id = u.id AND p.published)"
POPULAR_SQL = (
    "(SELECT count(*) FROM posts p WHERE p.author_id = u.id AND p.published AND p.likes >= 5)"
)
LIKES_SQL = "(SELECT coalesce(sum(p.likes), 0) FROM posts p WHERE p.author_id = u.id)"
SHARES_SQL = "(SELECT coalesce(sum(p.shares), 0) FROM posts p WHERE p.author_id = u.id)"


def models(
    followers: str = "Follow.followed_id",
    posts_target: str = "Post.author_id",
    posts_where: str = PUBLISHED,
    summed: str | None = "likes",
) -> str:
    likes = LIKES.format(summed=summed) if summed else ""
    return MODELS.format(
        followers=followers, posts_target=posts_target, posts_where=posts_where, likes=likes
    )


def wrong(engine: sa.Engine, column: str, truth: str) -> list[Any]:
    """Users whose ``column`` differs from ``truth`` (hand-written SQL)."""
    query = f"SELECT u.id, u.{column}, {truth} FROM users u ORDER BY u.id"  # noqa: S608 - test SQL
    with engine.connect() as conn:
        return [r for r in conn.execute(sa.text(query)) if r[1] != r[2]]


def records(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        # Built, not written: ``key`` is a reserved word on MariaDB and must be quoted.
        cols = [sa.column("key"), sa.column("state"), sa.column("fingerprint")]
        rows = conn.execute(sa.select(*cols).select_from(sa.table("counterfill_counters")))
        return {r.key: r for r in rows}


def run_states(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(sa.text("SELECT state FROM counterfill_runs ORDER BY id")).scalars()
        )


@dataclass
class Story:
    project: Project
    engine: sa.Engine
    revisions: dict[str, str] = field(default_factory=dict)
    out: dict[str, Any] = field(default_factory=dict)
    db: dict[str, Any] = field(default_factory=dict)


def seed(engine: sa.Engine) -> None:
    """Rows written behind the listeners' back: every counter starts wrong."""
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO users (id) VALUES " + ", ".join(f"({i})" for i in range(1, 41)))
        )
        follows = [(i, (i * 7) % 40 + 1) for i in range(1, 41) for _ in range(i % 3)]
        conn.execute(
            sa.text("INSERT INTO follows (follower_id, followed_id) VALUES (:a, :b)"),
            [{"a": a, "b": b} for a, b in follows],
        )
        posts = [
            {"a": (i * 3) % 40 + 1, "p": i % 3 != 0, "l": i % 9, "s": i % 4} for i in range(200)
        ]
        conn.execute(
            sa.text(
                "INSERT INTO posts (author_id, published, likes, shares) VALUES (:a, :p, :l, :s)"
            ),
            posts,
        )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_template(tmp_path_factory.mktemp("alembic-init"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mariadb"])
def story(request: pytest.FixtureRequest, template: Path, tmp_path_factory) -> Iterator[Story]:
    root = tmp_path_factory.mktemp(f"defs-{request.param}")
    with own_database(request, request.param, root) as url:
        engine = sa.create_engine(url)
        s = Story(make_project(template, root / "project", url), engine)
        try:
            _walk(s)
            yield s
        finally:
            engine.dispose()
            import redis

            delete_namespace(redis.Redis.from_url(REDIS_BASE), BROKER_NAMESPACE)


#: This module's own Dramatiq key namespace: the test never flushes a Redis database.
BROKER_NAMESPACE = f"cf-test-{RUN_ID}-definitions"


def _broker() -> str:
    return f"{REDIS_BASE.rstrip('/')}/0?namespace={BROKER_NAMESPACE}"


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _walk(s: Story) -> None:
    p, e = s.project, s.engine
    (p.root / "models.py").write_text(models())
    s.revisions["create"] = p.autogenerate("create tables")
    p.ok("upgrade", "head")
    seed(e)
    p.ok("counterfill", "enqueue", "--all", "--inline")
    s.db["after_first_backfill"] = records(e)
    s.out["check_clean"] = p.alembic("check")

    # 1. where= changes: only posts_count is proposed.
    (p.root / "models.py").write_text(models(posts_where=POPULAR))
    s.out["check_where"] = p.alembic("check")
    s.out["status_where"] = _json(p.alembic("counterfill", "status", "--json"))
    s.revisions["where"] = p.autogenerate("count popular posts")
    s.out["upgrade_where"] = p.alembic("upgrade", "head")
    s.db["after_where_upgrade"] = records(e)
    s.out["check_after_where"] = p.alembic("check")
    p.ok("counterfill", "enqueue", "--inline")
    s.db["wrong_where"] = wrong(e, "posts_count", POPULAR_SQL)
    s.db["after_where_backfill"] = records(e)

    # 2. sum= and a target change in one revision.
    (p.root / "models.py").write_text(
        models(followers="Follow.follower_id", posts_where=POPULAR, summed="shares")
    )
    s.revisions["sum_target"] = p.autogenerate("sum shares, count following")
    p.ok("upgrade", "head")
    p.ok("counterfill", "enqueue", "--inline")
    s.db["wrong_sum"] = wrong(e, "likes_total", SHARES_SQL)
    s.db["wrong_target"] = wrong(e, "followers_count", FOLLOWERS_OUT)

    # 3. A counter removed while its run is unfinished (batches sent, no worker).
    (p.root / "models.py").write_text(
        models(followers="Follow.follower_id", posts_where=POPULAR, summed="likes")
    )
    p.ok("revision", "--autogenerate", "-m", "back to likes")
    p.ok("upgrade", "head")
    sent = p.alembic("counterfill", "enqueue", env=clean_env(COUNTERFILL_BROKER_URL=_broker()))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    s.db["runs_mid"] = run_states(e)
    (p.root / "models.py").write_text(
        models(followers="Follow.follower_id", posts_where=POPULAR, summed=None)
    )
    s.revisions["remove"] = p.autogenerate("remove likes_total")
    p.ok("upgrade", "head")
    s.db["after_remove"] = records(e)
    s.db["runs_after_remove"] = run_states(e)
    s.out["check_after_remove"] = p.alembic("check")
    s.out["enqueue_after_remove"] = p.alembic("counterfill", "enqueue", "--inline")
    s.db["after_remove_backfill"] = records(e)

    # 4. Added back: a new column, a new request, a new backfill.
    (p.root / "models.py").write_text(
        models(followers="Follow.follower_id", posts_where=POPULAR, summed="likes")
    )
    s.revisions["add_back"] = p.autogenerate("likes_total again")
    p.ok("upgrade", "head")
    p.ok("counterfill", "enqueue", "--inline")
    s.db["wrong_added_back"] = wrong(e, "likes_total", LIKES_SQL)
    s.out["check_final"] = p.alembic("check")

    # 5. Downgrade the last step: drop the column, forget the request.
    p.ok("downgrade", "-1")
    s.db["after_downgrade"] = records(e)
    with e.connect() as conn:
        s.db["columns_after_downgrade"] = [c["name"] for c in sa.inspect(conn).get_columns("users")]
    p.ok("upgrade", "head")

    # 6. A typo in a target fails autogenerate with the declaration error.
    before = set(p.revisions())
    (p.root / "models.py").write_text(models(posts_target="Post.athor_id", posts_where=POPULAR))
    s.out["typo"] = p.alembic("revision", "--autogenerate", "-m", "typo")
    s.db["typo_new_files"] = set(p.revisions()) - before


# --- the tests ------------------------------------------------------------------------------


def test_backfill_records_each_counter_active_with_its_fingerprint(story: Story) -> None:
    rows = story.db["after_first_backfill"]
    assert {k: r.state for k, r in rows.items()} == {
        "users.followers_count": "active",
        "users.likes_total": "active",
        "users.posts_count": "active",
    }
    assert all(r.fingerprint for r in rows.values())
    check = story.out["check_clean"]
    assert check.returncode == 0 and "No new upgrade operations detected." in check.stdout


def test_changed_where_fails_check_and_shows_in_status(story: Story) -> None:
    check = story.out["check_where"]
    assert check.returncode != 0
    assert "request_counter_backfill" in check.stdout + check.stderr
    by_key = {d["counter"]: d for d in story.out["status_where"]}
    assert by_key["users.posts_count"]["state"] == "active"
    assert by_key["users.posts_count"]["definition_changed"] is True
    assert "definition changed since last backfill" in by_key["users.posts_count"]["hint"]
    assert by_key["users.followers_count"]["definition_changed"] is False


def test_autogenerate_renders_only_the_changed_counter_with_what_changed(story: Story) -> None:
    assert body(story.revisions["where"], "upgrade") == [
        '    """Upgrade schema."""',
        "    # users.posts_count changed: where posts.published IS 1 -> "
        "posts.published IS 1 AND posts.likes >= 5",
        "    op.request_counter_backfill('users', 'posts_count')",
    ]
    assert body(story.revisions["where"], "downgrade") == [
        '    """Downgrade schema."""',
        "    # the previous definition needs a backfill again",
        "    op.request_counter_backfill('users', 'posts_count')",
    ]


def test_upgrade_records_pending_and_logs_the_next_step(story: Story) -> None:
    result = story.out["upgrade_where"]
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "users.posts_count is pending" in line]
    assert len(lines) == 1
    assert "alembic counterfill enqueue" in lines[0]
    rows = story.db["after_where_upgrade"]
    assert rows["users.posts_count"].state == "pending"
    assert rows["users.followers_count"].state == "active"
    check = story.out["check_after_where"]
    assert check.returncode == 0, check.stdout + check.stderr


def test_backfill_under_the_new_where_is_exact(story: Story) -> None:
    assert story.db["wrong_where"] == []
    old = story.db["after_first_backfill"]["users.posts_count"].fingerprint
    new = story.db["after_where_backfill"]["users.posts_count"]
    assert new.state == "active" and new.fingerprint != old


def test_sum_and_target_changes_are_each_proposed_and_backfilled(story: Story) -> None:
    upgrade = body(story.revisions["sum_target"], "upgrade")
    assert upgrade == [
        '    """Upgrade schema."""',
        "    # users.followers_count changed: target followed_id -> follower_id",
        "    op.request_counter_backfill('users', 'followers_count')",
        "    # users.likes_total changed: sum likes -> shares",
        "    op.request_counter_backfill('users', 'likes_total')",
    ]
    assert story.db["wrong_sum"] == []
    assert story.db["wrong_target"] == []


def test_removing_a_counter_mid_run_renders_drop_and_cancel(story: Story) -> None:
    assert story.db["runs_mid"][-1] == "running"
    upgrade = body(story.revisions["remove"], "upgrade")
    cancel = [
        "    # users.likes_total removed from the models: end its backfill and forget its state",
        "    op.cancel_counter_backfill('users', 'likes_total')",
    ]
    if story.project.db_url.startswith("sqlite"):
        drop = [
            "    with op.batch_alter_table('users', schema=None) as batch_op:",
            "        batch_op.drop_column('likes_total')",
        ]
    else:
        drop = ["    op.drop_column('users', 'likes_total')"]
    assert upgrade == ['    """Upgrade schema."""', *cancel, *drop]
    downgrade = body(story.revisions["remove"], "downgrade")
    assert downgrade[-2:] == [
        "    # users.likes_total removed from the models: end its backfill and forget its state",
        "    op.request_counter_backfill('users', 'likes_total')",
    ]


def test_removed_counter_leaves_nothing_pending_and_enqueue_finishes_the_rest(
    story: Story,
) -> None:
    assert "users.likes_total" not in story.db["after_remove"]
    assert story.db["runs_after_remove"][-1] == "cancelled"
    # The run's other counters went back to pending; enqueue plans a fresh run for them.
    assert story.out["check_after_remove"].returncode == 0
    result = story.out["enqueue_after_remove"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert {r.state for r in story.db["after_remove_backfill"].values()} == {"active"}


def test_adding_the_counter_back_backfills_it_exactly(story: Story) -> None:
    assert body(story.revisions["add_back"], "upgrade")[-1] == (
        "    op.request_counter_backfill('users', 'likes_total')"
    )
    assert story.db["wrong_added_back"] == []
    check = story.out["check_final"]
    assert check.returncode == 0, check.stdout + check.stderr


def test_downgrade_reverses_the_request(story: Story) -> None:
    assert "users.likes_total" not in story.db["after_downgrade"]
    assert "likes_total" not in story.db["columns_after_downgrade"]


def test_a_typo_in_a_target_fails_autogenerate(story: Story) -> None:
    result = story.out["typo"]
    assert result.returncode != 0
    assert "Post has no column attribute 'athor_id'" in result.stdout + result.stderr
    assert story.db["typo_new_files"] == set()
