"""Counter definitions: fingerprints, runs planned under one, refusals, superseded/cancelled runs.

Old and new deploys are two model modules over the same tables
(backfill_models_old counts drafts in ``users.posts_count``, backfill_models
published posts). Exactness is judged with hand-written SQL (backfill_project.drift).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import backfill_models as m
import backfill_models_old as old_models
import pytest
import sqlalchemy as sa
from backfill_project import (
    TESTS_DIR,
    USER_COUNTERS,
    Project,
    batch_rows,
    counters_by_key,
    drift,
    run_rows,
    seed,
    states,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache, counters_of, definition, planning, progress
from alembic_counterfill.batch import run_batch
from alembic_counterfill.errors import DefinitionMismatch
from alembic_counterfill.runner import run_inline

DRAFTS_SQL = sa.text(
    "SELECT u.id, u.posts_count, "
    "(SELECT count(*) FROM posts p WHERE p.author_id = u.id AND NOT p.published) "
    "FROM users u ORDER BY u.id"
)


def _old() -> dict[str, object]:
    return {c.key: c for c in counters_of(old_models.Base)}


def _plan(engine: sa.Engine, counters: dict[str, object], keys=USER_COUNTERS, batch_size=100):
    chosen = [counters[k] for k in keys]
    with engine.begin() as conn:
        return planning.plan(conn, chosen, batch_size, declared=list(counters.values()))


@pytest.fixture
def project(tmp_path: Path, db_url: str) -> Project:
    return Project(tmp_path / "project", db_url)


# --- fingerprints -----------------------------------------------------------------------


def test_fingerprint_names_each_part_and_changes_with_each() -> None:
    new, old = counters_by_key(), _old()
    parts = definition.definition(new["users.posts_count"])
    assert parts == {
        "counter": "users.posts_count BY id",
        "child": "posts",
        "fk": "author_id",
        "rows": None,
        "where": "posts.published IS 1",
        "sum": None,
    }
    assert definition.fingerprint(new["users.posts_count"]) != definition.fingerprint(
        old["users.posts_count"]
    )
    for key in ("users.followers_count", "users.likes_total", "users.following_count"):
        assert definition.fingerprint(new[key]) == definition.fingerprint(old[key])
    fps = {definition.fingerprint(c) for c in new.values()}
    assert len(fps) == len(new)  # target, sum and where each tell counters apart
    changes = definition.changes(definition.definition(old["users.posts_count"]), parts)
    assert changes == ["where posts.published IS 0 -> posts.published IS 1"]


def test_fingerprint_compares_sql_not_lambdas_and_sees_literal_values() -> None:
    class B(DeclarativeBase):
        pass

    class Parent(B):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        a: Mapped[int] = counter_cache("Kid.parent_id", where=lambda: Kid.score > 10)
        b: Mapped[int] = counter_cache("Kid.parent_id", where=lambda: sa.and_(Kid.score.__gt__(10)))
        c: Mapped[int] = counter_cache("Kid.parent_id", where=lambda: Kid.score > 5)

    class Kid(B):
        __tablename__ = "kids"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(sa.ForeignKey("parents.id"))
        score: Mapped[int] = mapped_column(default=0)

    a, b, c = counters_of(B)
    assert definition.definition(a)["where"] == "kids.score > 10"
    # The column name differs, so compare the where parts alone.
    assert definition.definition(a)["where"] == definition.definition(b)["where"]
    assert definition.definition(c)["where"] == "kids.score > 5"


def test_fingerprint_is_the_same_in_another_process_and_hash_seed() -> None:
    here = {k: definition.fingerprint(c) for k, c in counters_by_key().items()}
    code = (
        "import json, backfill_models as m\n"
        "from alembic_counterfill import counters_of, definition\n"
        "print(json.dumps({c.key: definition.fingerprint(c) for c in counters_of(m.Base)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == here


# --- runs planned under a definition ----------------------------------------------------------


def test_completed_run_records_the_definition_it_followed(engine: sa.Engine) -> None:
    seed(engine, users=120)
    counters = counters_by_key()
    plan = _plan(engine, counters)
    (run,) = run_rows(engine)
    assert json.loads(run["fingerprints"]) == {
        k: definition.fingerprint(counters[k]) for k in USER_COUNTERS
    }
    run_inline(engine, counters, plan.batch_ids)
    with engine.connect() as conn:
        rows = progress.counter_rows(conn)
    for key in USER_COUNTERS:
        assert rows[key]["state"] == progress.ACTIVE
        assert rows[key]["fingerprint"] == definition.fingerprint(counters[key])
        assert json.loads(rows[key]["definition"]) == definition.definition(counters[key])
    assert drift(engine) == []


def test_old_models_refuse_a_batch_which_stays_for_matching_code(engine: sa.Engine) -> None:
    seed(engine, users=120)
    new = counters_by_key()
    plan = _plan(engine, new)
    first = plan.batch_ids[0]
    with pytest.raises(DefinitionMismatch, match="another definition of users.posts_count"):
        run_batch(engine, _old(), first)
    # The inline runner refuses too: recorded, neither done nor failed.
    assert run_inline(engine, _old(), plan.batch_ids) == []
    batches = {b["id"]: b for b in batch_rows(engine)}
    assert all(b["state"] != progress.DONE for b in batches.values())
    assert all(b["state"] != progress.FAILED for b in batches.values())
    assert all(b["refusals"] == 1 for b in batches.values())
    with engine.connect() as conn:
        (status,) = progress.statuses(conn, ["users.posts_count"])
    assert status.state == progress.BACKFILLING
    assert status.batches_waiting == len(plan.batch_ids)
    assert "refused by workers running another definition" in (status.hint or "")
    # The matching code completes it, exactly.
    run_inline(engine, new, plan.batch_ids)
    assert set(states(engine).values()) == {progress.ACTIVE}
    assert drift(engine) == []


def test_enqueue_under_a_new_definition_supersedes_the_old_run(engine: sa.Engine) -> None:
    seed(engine, users=150)
    old, new = _old(), counters_by_key()
    first = _plan(engine, old)
    run_inline(engine, old, first.batch_ids[:1])  # the old run is part-way
    second = _plan(engine, new)
    assert second.resumed_run_ids == [] and len(second.new_run_ids) == 1
    runs = {r["id"]: r for r in run_rows(engine)}
    assert runs[first.run_ids[0]]["state"] == progress.RUN_SUPERSEDED
    # A stale message for the old run is skipped, whichever code receives it.
    outcome = run_batch(engine, old, first.batch_ids[1])
    assert outcome.applied is False
    run_inline(engine, new, second.batch_ids)
    assert set(states(engine).values()) == {progress.ACTIVE}
    assert drift(engine) == []  # exact under the new definition (published posts)
    with engine.connect() as conn:
        drafts = [r for r in conn.execute(DRAFTS_SQL) if r[1] != r[2]]
    assert drafts  # and not under the old one


def test_counter_removed_mid_run_supersedes_it_for_what_is_still_declared(
    engine: sa.Engine,
) -> None:
    seed(engine, users=150)
    counters = counters_by_key()
    first = _plan(engine, counters)
    run_inline(engine, counters, first.batch_ids[:1])
    remaining = {k: c for k, c in counters.items() if k != "users.likes_total"}
    with engine.begin() as conn:
        chosen = planning.choose(conn, list(remaining.values()), (), False)
        second = planning.plan(conn, chosen, 100, declared=list(remaining.values()))
    assert sorted(second.counter_keys) == sorted(k for k in USER_COUNTERS if k in remaining)
    (new_run,) = [r for r in run_rows(engine) if r["id"] in second.new_run_ids]
    assert new_run["counter_keys"].split(",") == sorted(second.counter_keys)
    assert run_rows(engine)[0]["state"] == progress.RUN_SUPERSEDED
    assert run_inline(engine, remaining, second.batch_ids)
    recorded = states(engine)
    assert all(recorded[k] == progress.ACTIVE for k in remaining if k in USER_COUNTERS)
    assert [d for d in drift(engine) if d[1] != "likes_total"] == []


# --- cancel, unknown, missing columns (through the command line) ------------------------------


def test_cancel_ends_a_run_and_enqueue_plans_a_fresh_one(
    project: Project, engine: sa.Engine
) -> None:
    seed(engine, users=150)
    counters = counters_by_key()
    first = _plan(engine, counters)
    run_inline(engine, counters, first.batch_ids[:1])
    result = project.cli("cancel", "users.posts_count")
    assert result.exit_code == 0, result.output
    assert f"cancelled run {first.run_ids[0]} on users" in result.output
    assert run_rows(engine)[0]["state"] == progress.RUN_CANCELLED
    assert set(states(engine).values()) == {progress.PENDING}
    assert run_batch(engine, counters, first.batch_ids[1]).applied is False
    again = project.cli("cancel")
    assert again.exit_code == 0 and "nothing to cancel" in again.output
    done = project.cli("enqueue", "--inline")
    assert done.exit_code == 0, done.output
    assert set(states(engine).values()) == {progress.ACTIVE}
    assert drift(engine) == []


def test_cancel_names_an_unknown_counter(project: Project, engine: sa.Engine) -> None:
    seed(engine, users=5)
    result = project.cli("cancel", "users.nope")
    assert result.exit_code == 2
    assert "unknown counter 'users.nope'" in result.output


def test_unknown_counters_until_verify_records_them(project: Project, engine: sa.Engine) -> None:
    m.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(m.User), [{"id": i, "name": "x"} for i in range(1, 4)])
        conn.execute(sa.insert(m.Follow), [{"follower_id": 1, "followed_id": 2}])
    data = json.loads(project.cli("status", "--json").output)
    assert {d["state"] for d in data} == {progress.UNKNOWN}
    assert all("verify" in d["hint"] for d in data)
    human = project.cli("status").output
    assert "users.followers_count  unknown" in human and "next steps:" in human
    # followers_count is wrong (0 instead of 1 for user 2): verify reports, records nothing.
    result = project.cli("verify", "users.followers_count")
    assert result.exit_code == 1
    assert states(engine) == {}
    assert project.cli("verify", "--fix", "users.followers_count").exit_code == 0
    assert project.cli("verify", "users.following_count").exit_code == 1
    recorded = states(engine)
    assert recorded == {"users.followers_count": progress.ACTIVE}
    with engine.connect() as conn:
        row = progress.counter_rows(conn)["users.followers_count"]
    assert row["fingerprint"] == definition.fingerprint(counters_by_key()["users.followers_count"])


def test_cli_on_a_database_without_the_counter_columns_says_so(
    project: Project, engine: sa.Engine
) -> None:
    with engine.begin() as conn:  # the tables as they were before the counter migration
        conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(50))"))
    data = json.loads(project.cli("status", "--json").output)
    by_key = {d["counter"]: d for d in data}
    assert by_key["users.posts_count"]["state"] == progress.UNKNOWN
    assert "run `alembic upgrade head`" in by_key["users.posts_count"]["hint"]
    result = project.cli("enqueue", "--inline", "users.posts_count")
    assert result.exit_code == 1
    assert "users.posts_count: the column is not in the database" in result.output
    assert "Traceback" not in result.output
    with engine.connect() as conn:
        assert not progress.has_tables(conn)  # nothing half-written


# --- status and list flag a definition the running code does not share ----------------------


def test_status_and_list_flag_a_changed_definition(project: Project, engine: sa.Engine) -> None:
    seed(engine, users=60)
    old = _old()
    run_inline(engine, old, _plan(engine, old).batch_ids)  # recorded under the old models
    data = {d["counter"]: d for d in json.loads(project.cli("status", "--json").output)}
    assert data["users.posts_count"]["definition_changed"] is True
    assert "definition changed since last backfill" in data["users.posts_count"]["hint"]
    assert data["users.followers_count"]["definition_changed"] is False
    listed = project.cli("list").output
    assert "users.posts_count      active (definition changed)" in listed
    as_json = {d["counter"]: d for d in json.loads(project.cli("list", "--json").output)}
    assert as_json["users.posts_count"]["definition_changed"] is True


def test_counter_value_counts_live_while_a_redefined_counter_is_pending(
    engine: sa.Engine,
) -> None:
    from sqlalchemy.orm import Session

    from alembic_counterfill import read

    seed(engine, users=30)
    old, new = _old(), counters_by_key()
    run_inline(engine, old, _plan(engine, old).batch_ids)  # filled under the old where=
    with engine.connect() as conn:
        author, cached, published = conn.execute(
            sa.text(
                "SELECT u.id, u.posts_count, (SELECT count(*) FROM posts p "
                "WHERE p.author_id = u.id AND p.published) FROM users u "
                "WHERE u.posts_count <> (SELECT count(*) FROM posts p "
                "WHERE p.author_id = u.id AND p.published) ORDER BY u.id"
            )
        ).first()
    read.clear_cache()
    with Session(engine) as session:
        user = session.get(m.User, author)
        # Recorded under another definition than this code's: not trusted.
        assert read.counter_value(session, user, "posts_count") == published != cached
    parts = definition.definition(new["users.posts_count"])
    with engine.begin() as conn:  # what the migration's request does
        for stmt in progress.request_statements(
            "users.posts_count",
            "users",
            "posts_count",
            None,
            fingerprint=definition.fingerprint_of(parts),
            definition=definition.encode(parts),
        ):
            conn.execute(stmt)
    read.clear_cache()
    with Session(engine) as session:
        user = session.get(m.User, author)
        assert read.counter_value(session, user, "posts_count") == published  # pending: live
    run_inline(engine, new, _plan(engine, new, ["users.posts_count"]).batch_ids)
    read.clear_cache()
    with Session(engine) as session:
        user = session.get(m.User, author)
        assert user.posts_count == published  # backfilled under the new definition
        assert read.counter_value(session, user, "posts_count") == published


#: Fingerprints computed with SQLAlchemy 2.0.58 and 2.1.9 (identical): a version that
#: compiles a where= differently would make every recorded counter look redefined.
GOLDEN = {
    "boards.drafts_count": "e4dc553d60b1c1dd",
    "boards.pins_count": "343d4a56ad29235d",
    "boards.score_total": "91eeacb92ee91dfd",
    "boards.visible_count": "b94829da9844d311",
}


def test_fingerprints_are_pinned_across_sqlalchemy_versions() -> None:
    import definition_models as d

    counters = {c.key: c for c in counters_of(d.Base)}
    assert definition.definition(counters["boards.visible_count"])["where"] == (
        "pins.hidden IS 0 AND pins.score >= 5 AND pins.kind IN ('photo', 'video')"
    )
    assert definition.fingerprints(counters) == GOLDEN


def test_autogenerate_compare_requests_redefined_and_cancels_undeclared(
    sqlite_url: str,
) -> None:
    from types import SimpleNamespace

    from alembic.operations import ops as alembic_ops

    from alembic_counterfill import autogen
    from alembic_counterfill.ops import CancelCounterBackfillOp, RequestCounterBackfillOp

    engine = sa.create_engine(sqlite_url)
    old = definition.definition(_old()["users.posts_count"])
    with engine.begin() as conn:
        progress.ensure_tables(conn)
        for key, fp, parts in [
            ("users.gone_count", None, None),
            ("users.posts_count", definition.fingerprint_of(old), definition.encode(old)),
        ]:
            table, column = key.split(".")
            for stmt in progress.request_statements(
                key, table, column, None, fingerprint=fp, definition=parts
            ):
                conn.execute(stmt)
    with engine.connect() as conn:
        upgrade = alembic_ops.UpgradeOps(ops=[])
        autogen.compare(SimpleNamespace(metadata=m.Base.metadata, connection=conn), upgrade, {None})
        cancel, request = upgrade.ops
        assert isinstance(cancel, CancelCounterBackfillOp) and cancel.key == "users.gone_count"
        assert isinstance(request, RequestCounterBackfillOp)
        assert request.key == "users.posts_count"
        assert request.reason == [
            "users.posts_count changed: where posts.published IS 0 -> posts.published IS 1"
        ]
        # Without models to compare, nothing is proposed.
        upgrade = alembic_ops.UpgradeOps(ops=[])
        autogen.compare(SimpleNamespace(metadata=None, connection=conn), upgrade, {None})
        assert upgrade.ops == []
    engine.dispose()


def test_fingerprint_of_a_single_table_subclass_counter_names_its_rows() -> None:
    class Base(DeclarativeBase):
        pass

    class Topic(Base):
        __tablename__ = "topics"
        id: Mapped[int] = mapped_column(primary_key=True)
        entries_count: Mapped[int] = counter_cache("Entry.topic_id")
        comments_count: Mapped[int] = counter_cache("Comment.topic_id")

    class Entry(Base):
        __tablename__ = "entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(sa.String(20))
        topic_id: Mapped[int] = mapped_column(sa.ForeignKey("topics.id"))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "entry"}

    class Comment(Entry):
        __mapper_args__ = {"polymorphic_identity": "comment"}

    counters = {c.key: c for c in counters_of(Base)}
    base_parts = definition.definition(counters["topics.entries_count"])
    sub_parts = definition.definition(counters["topics.comments_count"])
    assert base_parts["rows"] is None
    assert sub_parts["rows"] == "kind IN ('comment')"
    assert definition.fingerprint(counters["topics.entries_count"]) != definition.fingerprint(
        counters["topics.comments_count"]
    )
    assert any("'comment'" in c for c in definition.changes(base_parts, sub_parts))
    # held until here: the declarative registry keeps classes only weakly
    assert Topic.__name__ == "Topic" and Comment.__name__ == "Comment"


def test_fingerprint_of_a_joined_subclass_sum_names_the_summed_columns_table() -> None:
    class Base(DeclarativeBase):
        pass

    class Board(Base):
        __tablename__ = "boards"
        id: Mapped[int] = mapped_column(primary_key=True)
        video_length: Mapped[int] = counter_cache("Video.board_id", sum="length")
        video_seconds: Mapped[int] = counter_cache("Video.board_id", sum="seconds")

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(sa.String(20))
        board_id: Mapped[int] = mapped_column(sa.ForeignKey("boards.id"))
        length: Mapped[int] = mapped_column(default=0)
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}

    class Video(Item):
        __tablename__ = "videos"
        id: Mapped[int] = mapped_column(sa.ForeignKey("items.id"), primary_key=True)
        seconds: Mapped[int] = mapped_column(default=0)
        __mapper_args__ = {"polymorphic_identity": "video"}

    counters = {c.key: c for c in counters_of(Base)}
    in_base = definition.definition(counters["boards.video_length"])
    in_own = definition.definition(counters["boards.video_seconds"])
    # The counting table's own column keeps its bare name (existing fingerprints hold);
    # the subclass table's column is qualified, so moving it changes the definition.
    assert in_base["sum"] == "length"
    assert in_own["sum"] == "videos.seconds"
    assert any("videos.seconds" in c for c in definition.changes(in_base, in_own))
    # held until here: the declarative registry keeps classes only weakly
    assert Board.__name__ == "Board" and Video.__name__ == "Video"
