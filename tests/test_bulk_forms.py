"""ORM bulk statements via ``Session.execute`` keep counters exact (SQLite, PostgreSQL, MariaDB).

Every test checks the counters against the independent GROUP BY truth of
``social.assert_exact`` and, where it names a value, the value itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from social import Base, Follow, Post, User, assert_exact, cached, truth
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alembic_counterfill import counter_cache, paused


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 7)])
        s.commit()
    yield engine


def row(engine: sa.Engine, uid: int) -> tuple[int, ...]:
    """``(followers, following, published posts, likes, referrals)`` as cached for one user."""
    with engine.connect() as conn:
        return cached(conn)[uid]


def seed_posts(engine: sa.Engine) -> None:
    """Posts 1-9: author 1 + id % 3, published when id is even, likes = id."""
    with Session(engine) as s:
        s.execute(
            sa.insert(Post),
            [
                {"id": i, "author_id": 1 + i % 3, "published": i % 2 == 0, "likes": i}
                for i in range(1, 10)
            ],
        )
        s.commit()


# --- INSERT ------------------------------------------------------------------------------------


def test_bulk_insert_list_of_rows_counts_and_sums(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(Follow), [{"follower_id": 1, "followed_id": j} for j in (2, 3, 4)])
        s.execute(
            sa.insert(Post),
            [
                {"author_id": 2, "published": True, "likes": 3},
                {"author_id": 2, "published": False, "likes": 4},
                {"author_id": None, "likes": 9},
            ],
        )
        s.commit()
    assert row(db, 1)[1] == 3
    assert row(db, 2) == (1, 0, 1, 7, 0)
    assert_exact(db)


def test_bulk_insert_uses_column_defaults(db: sa.Engine) -> None:
    # published defaults to True and likes to 0 (Python-side scalar defaults).
    with Session(db) as s:
        s.execute(sa.insert(Post), [{"author_id": 3}, {"author_id": 3, "likes": 2}])
        s.commit()
    assert row(db, 3)[2:4] == (2, 2)
    assert_exact(db)


def test_single_row_and_values_forms(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(Post), {"author_id": 4, "likes": 1})
        s.execute(sa.insert(Post).values(author_id=4, likes=2, published=False))
        s.execute(sa.insert(Post).values({Post.author_id: 4, "likes": 3}))
        s.commit()
    assert row(db, 4)[2:4] == (2, 6)
    assert_exact(db)


def test_multi_values_insert(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(
            sa.insert(Post).values(
                [{"author_id": 5, "likes": 1}, {"author_id": 6, "likes": 2, "published": False}]
            )
        )
        s.commit()
    assert row(db, 5)[2:4] == (1, 1)
    assert row(db, 6)[2:4] == (0, 2)
    assert_exact(db)


def test_insert_with_sql_expression_values_recounts(db: sa.Engine) -> None:
    likes = sa.select(sa.func.count()).select_from(User).scalar_subquery()  # 6 users
    with Session(db) as s:
        s.execute(sa.insert(Post).values(author_id=2, likes=likes))
        s.commit()
    assert row(db, 2)[3] == 6
    assert_exact(db)


def test_insert_from_select_recounts_selected_parents(db: sa.Engine) -> None:
    seed_posts(db)
    src = sa.select(Post.id + 100, Post.author_id, Post.likes).where(Post.likes > 5)
    with Session(db) as s:
        s.execute(sa.insert(Post).from_select(["id", "author_id", "likes"], src))
        s.commit()
    assert_exact(db)
    with db.connect() as conn:
        assert truth(conn)[1][3] == 2 * (3 + 6 + 9) - 3  # 6 and 9 copied, 3 not


def test_core_table_insert_through_session(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(
            sa.insert(Follow.__table__), [{"follower_id": 2, "followed_id": j} for j in (1, 3)]
        )
        s.commit()
    assert row(db, 2)[1] == 2
    assert_exact(db)


def test_self_referential_bulk_insert(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(User), [{"id": 10 + i, "referrer_id": 1} for i in range(3)])
        s.commit()
    assert row(db, 1)[4] == 3
    assert_exact(db)


def test_caller_result_of_insert_with_returning_is_unchanged(db: sa.Engine) -> None:
    with Session(db) as s:
        got = s.scalars(
            sa.insert(Post).returning(Post.id, sort_by_parameter_order=True),
            [{"id": 40, "author_id": 1}, {"id": 41, "author_id": 2}],
        ).all()
        s.commit()
    assert got == [40, 41]
    assert_exact(db)


def is_mysql(engine: sa.Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def upsert_module(engine: sa.Engine):  # noqa: ANN201 - dialect insert() of the engine's backend
    return postgresql if engine.dialect.name == "postgresql" else sqlite


def test_upsert_do_nothing_counts_only_new_rows(db: sa.Engine) -> None:
    seed_posts(db)
    if is_mysql(db):
        stmt = mysql.insert(Post).prefix_with("IGNORE")
    else:
        stmt = upsert_module(db).insert(Post).on_conflict_do_nothing(index_elements=["id"])
    with Session(db) as s:
        s.execute(
            stmt, [{"id": 1, "author_id": 5, "likes": 50}, {"id": 50, "author_id": 5, "likes": 7}]
        )
        s.commit()
    assert row(db, 5)[3] == 7
    assert_exact(db)


def test_upsert_do_update_moving_existing_rows_recounts_both_parents(db: sa.Engine) -> None:
    seed_posts(db)  # post 1 belongs to user 2, post 2 to user 3
    stmt: Any
    if is_mysql(db):
        mins = mysql.insert(Post)
        stmt = mins.on_duplicate_key_update(
            author_id=mins.inserted.author_id, likes=mins.inserted.likes
        )
    else:
        ins = upsert_module(db).insert(Post)
        stmt = ins.on_conflict_do_update(
            index_elements=["id"],
            set_={"author_id": ins.excluded.author_id, "likes": ins.excluded.likes},
        )
    with Session(db) as s:
        s.execute(
            stmt, [{"id": 1, "author_id": 6, "likes": 100}, {"id": 60, "author_id": 6, "likes": 1}]
        )
        s.commit()
    assert row(db, 6)[3] == 101
    assert row(db, 2)[3] == 4 + 7  # post 1 left user 2
    assert_exact(db)


# --- DELETE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
def test_bulk_delete_where(db: sa.Engine, sync: object) -> None:
    seed_posts(db)
    with Session(db) as s:
        s.scalars(sa.select(Post)).all()  # loaded children, for the synchronize strategies
        result = s.execute(
            sa.delete(Post).where(Post.likes >= 5), execution_options={"synchronize_session": sync}
        )
        assert result.rowcount == 5
        s.commit()
    assert row(db, 1)[2:4] == (0, 3)
    assert_exact(db)


def test_bulk_delete_with_callers_returning(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        got = s.scalars(sa.delete(Post).where(Post.author_id == 2).returning(Post.id)).all()
        s.commit()
    assert sorted(got) == [1, 4, 7]
    assert row(db, 2)[2:4] == (0, 0)
    assert_exact(db)


def test_bulk_delete_returning_entities(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        got = s.scalars(
            sa.delete(Post).where(Post.published.is_(True)).returning(Post),
            execution_options={"synchronize_session": "fetch"},
        ).all()
        ids = sorted(p.id for p in got)
        s.commit()
    assert ids == [2, 4, 6, 8]
    assert_exact(db)


def test_bulk_delete_rowcount_without_returning_is_the_callers(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        result = s.execute(sa.delete(Post).where(Post.id > 100))
        assert result.rowcount == 0
        result = s.execute(sa.delete(Post).where(Post.id < 3))
        assert result.rowcount == 2
        s.commit()
    assert_exact(db)


def test_bulk_delete_with_other_table_in_where(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        s.execute(
            sa.delete(Post).where(
                Post.author_id.in_(sa.select(User.id).where(User.name.in_(["u1", "u2"])))
            )
        )
        s.commit()
    assert row(db, 1)[3] == 0 and row(db, 2)[3] == 0
    assert_exact(db)


def test_bulk_delete_of_follows_by_composite_key(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(
            sa.insert(Follow),
            [
                {"follower_id": a, "followed_id": b}
                for a in range(1, 7)
                for b in range(1, 7)
                if a != b
            ],
        )
        s.commit()
        s.execute(sa.delete(Follow).where(Follow.followed_id.in_([1, 2])))
        s.commit()
    assert row(db, 1)[:2] == (0, 4)
    assert_exact(db)


def test_loaded_parent_sees_fresh_counter_after_bulk_delete(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        user = s.get(User, 1)
        assert user is not None and user.likes_total == 3 + 6 + 9
        s.execute(sa.delete(Post).where(Post.id == 3))
        assert user.likes_total == 15
        s.rollback()
    assert_exact(db)


# --- UPDATE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
def test_bulk_update_moves_children_between_parents(db: sa.Engine, sync: object) -> None:
    seed_posts(db)
    with Session(db) as s:
        s.scalars(sa.select(Post)).all()
        result = s.execute(
            sa.update(Post).where(Post.author_id == 2).values(author_id=5),
            execution_options={"synchronize_session": sync},
        )
        assert result.rowcount == 3
        s.commit()
    assert row(db, 2)[2:4] == (0, 0)
    assert row(db, 5)[2:4] == (1, 1 + 4 + 7)
    assert_exact(db)


def test_bulk_update_flips_where_and_changes_sum(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        s.execute(
            sa.update(Post)
            .where(Post.id <= 4)
            .values(published=~Post.published, likes=Post.likes * 10)
        )
        s.commit()
    assert_exact(db)
    assert row(db, 2)[2:4] == (1 + 0, 10 + 40 + 7)  # post 1 now published, 4 not, 7 not


def test_bulk_update_to_and_from_null(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        s.execute(sa.update(Post).where(Post.author_id == 1).values(author_id=None))
        s.execute(sa.update(Post).where(Post.id == 3).values(author_id=4))
        s.commit()
    assert row(db, 1)[3] == 0 and row(db, 4)[3] == 3
    assert_exact(db)


def test_bulk_update_of_other_columns_skips_the_counters(db: sa.Engine, caplog) -> None:  # noqa: ANN001
    seed_posts(db)
    statements: list[str] = []
    sa.event.listen(db, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with Session(db) as s:
        s.execute(sa.update(Post).where(Post.id < 5).values(title="x"))
        s.commit()
    assert not any("users" in q for q in statements)
    assert_exact(db)


def test_bulk_update_with_callers_returning(db: sa.Engine) -> None:
    if not db.dialect.update_returning:
        pytest.skip(f"{db.dialect.name} has no UPDATE ... RETURNING: the caller cannot ask for it")
    seed_posts(db)
    with Session(db) as s:
        got = (
            s.execute(
                sa.update(Post).where(Post.author_id == 3).values(author_id=1).returning(Post.id)
            )
            .scalars()
            .all()
        )
        s.commit()
    assert sorted(got) == [2, 5, 8]
    assert_exact(db)


def test_bulk_update_moves_follow_primary_key(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(Follow), [{"follower_id": 1, "followed_id": b} for b in (2, 3)])
        s.commit()
        s.execute(sa.update(Follow).where(Follow.followed_id == 2).values(followed_id=6))
        s.commit()
    assert row(db, 2)[0] == 0 and row(db, 6)[0] == 1
    assert_exact(db)


def test_bulk_update_by_primary_key(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        s.execute(
            sa.update(Post),
            [
                {"id": 1, "author_id": 6},
                {"id": 2, "published": False},
                {"id": 3, "likes": 30},
                {"id": 4, "title": "only the title"},
            ],
        )
        s.commit()
    assert row(db, 6)[2:4] == (0, 1)
    assert row(db, 1)[3] == 30 + 6 + 9
    assert_exact(db)


def test_bulk_update_by_primary_key_core_table(db: sa.Engine) -> None:
    seed_posts(db)
    t = Post.__table__
    with Session(db) as s:
        s.execute(
            sa.update(t).where(t.c.id == sa.bindparam("pid")).values(author_id=sa.bindparam("a")),
            [{"pid": 1, "a": 5}, {"pid": 2, "a": 5}],
        )
        s.commit()
    assert row(db, 5)[3] == 3
    assert_exact(db)


# --- pause, rollback, what the hook cannot see ---------------------------------------------------


def test_paused_bulk_statements_are_left_to_verify(db: sa.Engine) -> None:
    with Session(db) as s, paused():
        s.execute(sa.insert(Post), [{"author_id": 1, "likes": 5}])
        s.commit()
    assert row(db, 1)[3] == 0  # drifted on purpose: a backfill or verify --fix repairs it


def test_rollback_discards_bulk_deltas(db: sa.Engine) -> None:
    with Session(db) as s:
        s.execute(sa.insert(Post), [{"author_id": 1, "likes": 5}])
        s.rollback()
    assert row(db, 1)[3] == 0
    assert_exact(db)


def test_core_connection_execute_is_not_seen(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(sa.insert(Post), [{"author_id": 1, "likes": 5}])
    assert row(db, 1)[3] == 0  # documented: Connection.execute bypasses the Session
    with pytest.raises(AssertionError):
        assert_exact(db)


def test_untrackable_insert_logs_a_warning(db: sa.Engine, caplog) -> None:  # noqa: ANN001
    fk = sa.select(sa.func.min(User.id)).scalar_subquery()
    with caplog.at_level(logging.WARNING, logger="alembic_counterfill"), Session(db) as s:
        s.execute(sa.insert(Post).values(author_id=fk, likes=1))
        s.commit()
    assert "verify --fix" in caplog.text
    # What the warning is about: user 1 drifted by exactly that post, nobody else did.
    with db.connect() as conn:
        t, c = truth(conn), cached(conn)
    assert {u for u in t if t[u] != c[u]} <= {1}
    assert t[1][2:4] == (1, 1)  # the independent truth sees the published post and its like


def outcome(result: sa.Result) -> tuple[object, ...]:
    """What a caller can observe of a DML result: rowcount, returns_rows, and all() or its error."""
    try:
        rows: object = result.all()
    except sa.exc.ResourceClosedError:
        rows = "ResourceClosedError"
    return (getattr(result, "rowcount", None), result.returns_rows, rows)


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
@pytest.mark.parametrize("verb", ["update", "delete"])
def test_caller_sees_the_same_result_as_without_counters(
    db: sa.Engine, verb: str, sync: object
) -> None:
    seed_posts(db)

    def run(s: Session) -> tuple[object, ...]:
        stmt = (
            sa.update(Post).where(Post.id < 5).values(author_id=6)
            if verb == "update"
            else sa.delete(Post).where(Post.id < 5)
        )
        got = outcome(s.execute(stmt, execution_options={"synchronize_session": sync}))
        s.rollback()
        return got

    with Session(db) as s:
        with paused():
            plain = run(s)
        tracked = run(s)
    assert tracked == plain
    assert plain[0] == 4


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False, "returning"])
def test_caller_sees_the_same_result_when_deleting_every_row(db: sa.Engine, sync: object) -> None:
    # Every row of a small table: on MariaDB the DELETE reaches its rows through
    # a JSON_TABLE of their keys (DELETE ... USING), unless the caller gets rows
    # back. Result, rowcount and the session's loaded objects must be as without
    # counters, for each synchronize_session and for the caller's own RETURNING.
    seed_posts(db)

    def run(s: Session) -> tuple[object, ...]:
        loaded = s.scalars(sa.select(Post).order_by(Post.id)).all()
        stmt = sa.delete(Post)
        if sync == "returning":  # an ORM result: the rows, in no promised order
            got = (9, True, sorted(s.scalars(stmt.returning(Post.id)).all()))
        else:
            got = outcome(s.execute(stmt, execution_options={"synchronize_session": sync}))
        gone = [p.id for p in loaded if p not in s]
        s.rollback()
        return (*got, gone)

    with Session(db) as s:
        with paused():
            plain = run(s)
        tracked = run(s)
    assert tracked == plain
    assert plain[0] == 9


class Keyed(DeclarativeBase):
    """Children keyed by text: MariaDB's bulk DELETE keeps the key list (JSON rows are integers)."""


class Shelf(Keyed):
    __tablename__ = "shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    labels_count: Mapped[int] = counter_cache("Label.shelf_id")


class Label(Keyed):
    __tablename__ = "labels"
    code: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    shelf_id: Mapped[int] = mapped_column(sa.ForeignKey("shelves.id"))


@pytest.mark.parametrize("sync", ["auto", "fetch", "evaluate", False])
def test_caller_sees_the_same_result_when_deleting_text_keyed_rows(
    engine: sa.Engine, sync: object
) -> None:
    Keyed.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Shelf(id=1), Shelf(id=2)])
        s.flush()
        s.add_all([Label(code=f"c{i}", shelf_id=1 + i % 2) for i in range(6)])
        s.commit()

    def run(s: Session) -> tuple[object, ...]:
        loaded = s.scalars(sa.select(Label).order_by(Label.code)).all()
        stmt = sa.delete(Label).where(Label.shelf_id == 1)
        got = outcome(s.execute(stmt, execution_options={"synchronize_session": sync}))
        gone = [label.code for label in loaded if label not in s]
        return (*got, gone)

    with Session(engine) as s:
        with paused():
            plain = run(s)
        s.rollback()
        tracked = run(s)
        s.commit()
    assert tracked == plain
    assert plain[0] == 3
    with engine.connect() as conn:
        cached = conn.execute(sa.select(Shelf.id, Shelf.labels_count).order_by(Shelf.id)).all()
        counts = dict(
            conn.execute(sa.text("SELECT shelf_id, COUNT(*) FROM labels GROUP BY shelf_id")).all()
        )
    assert [tuple(r) for r in cached] == [(1, counts.get(1, 0)), (2, counts.get(2, 0))]
    assert counts == {2: 3}


def test_bulk_statement_on_unconfigured_models(tmp_path) -> None:  # noqa: ANN001
    # Brand-new mapped classes, never configured: the first thing they see is a bulk INSERT
    # (counters resolve at mapper configuration, which the ORM skips for bulk statements).

    class Fresh(DeclarativeBase):
        pass

    class Board(Fresh):
        __tablename__ = "boards"
        id: Mapped[int] = mapped_column(primary_key=True)
        pins_count: Mapped[int] = counter_cache("Pin.board_id")

    class Pin(Fresh):
        __tablename__ = "pins"
        id: Mapped[int] = mapped_column(primary_key=True)
        board_id: Mapped[int] = mapped_column(sa.ForeignKey("boards.id"))

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    Fresh.metadata.create_all(engine)
    with Session(engine) as s:
        s.execute(sa.insert(Board), [{"id": 1}])
        s.execute(sa.insert(Pin), [{"board_id": 1}, {"board_id": 1}])
        s.commit()
        assert s.scalar(sa.select(Board.pins_count)) == 2
    engine.dispose()


COLD_START = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from alembic_counterfill import counter_cache

class Base(DeclarativeBase):
    pass

class Board(Base):
    __tablename__ = "boards"
    id: Mapped[int] = mapped_column(primary_key=True)
    pins_count: Mapped[int] = counter_cache("Pin.board_id")

class Pin(Base):
    __tablename__ = "pins"
    id: Mapped[int] = mapped_column(primary_key=True)
    board_id: Mapped[int] = mapped_column(sa.ForeignKey("boards.id"))

engine = sa.create_engine("sqlite://")
Base.metadata.create_all(engine)
with Session(engine) as s:
    s.execute(sa.insert(Board), [{"id": 1}])
    s.execute(sa.insert(Pin), [{"board_id": 1}])
    print(s.scalar(sa.select(Board.pins_count)))
"""


def test_bulk_statement_is_first_thing_a_fresh_process_does() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", COLD_START], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "1"


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch"])
def test_session_objects_are_synchronized_as_the_caller_asked(db: sa.Engine, sync: str) -> None:
    seed_posts(db)
    with Session(db) as s:
        posts = {p.id: p for p in s.scalars(sa.select(Post))}
        s.execute(
            sa.update(Post).where(Post.author_id == 2).values(author_id=5),
            execution_options={"synchronize_session": sync},
        )
        assert [posts[i].author_id for i in (1, 4, 7)] == [5, 5, 5]
        s.execute(
            sa.delete(Post).where(Post.id == 2), execution_options={"synchronize_session": sync}
        )
        assert posts[2] not in s
        s.commit()
    assert_exact(db)


def test_bulk_update_with_other_table_in_where(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        s.execute(
            sa.update(Post)
            .where(Post.author_id == User.id, User.name.in_(["u1", "u3"]))
            .values(published=True),
            execution_options={"synchronize_session": False},
        )
        s.commit()
    assert row(db, 1)[2] == 3 and row(db, 3)[2] == 3
    assert_exact(db)


def test_orm_returning_from_statement_delete(db: sa.Engine) -> None:
    seed_posts(db)
    with Session(db) as s:
        stmt = sa.select(Post).from_statement(
            sa.delete(Post).where(Post.author_id == 3).returning(Post)
        )
        ids = sorted(p.id for p in s.scalars(stmt))
        s.commit()
    assert ids == [2, 5, 8]
    assert row(db, 3)[2:4] == (0, 0)
    assert_exact(db)


def test_upsert_by_constraint_name_recounts_old_parents(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i, name=f"u{i}") for i in (1, 2)])
        s.execute(sa.insert(Post), [{"id": 1, "author_id": 1, "likes": 4}])
        s.commit()
        ins = postgresql.insert(Post)
        pkey = Post.__table__.primary_key.name or "posts_pkey"
        stmt = ins.on_conflict_do_update(
            constraint=pkey, set_={"author_id": ins.excluded.author_id}
        )
        s.execute(stmt, [{"id": 1, "author_id": 2, "likes": 0}])
        s.commit()
    assert row(engine, 1)[2:4] == (0, 0) and row(engine, 2)[2:4] == (1, 4)
    assert_exact(engine)
    engine.dispose()


class Slugged(DeclarativeBase):
    """Articles with a secondary unique key, the target of upserts other than the primary key."""


class Writer(Slugged):
    __tablename__ = "writers"
    id: Mapped[int] = mapped_column(primary_key=True)
    articles_count: Mapped[int] = counter_cache("Article.writer_id")


class Article(Slugged):
    __tablename__ = "articles"
    __table_args__ = (sa.UniqueConstraint("slug", name="uq_articles_slug"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(sa.String(20))
    writer_id: Mapped[int] = mapped_column(sa.ForeignKey("writers.id"))


def test_upsert_conflicting_on_a_secondary_unique_key_recounts_old_parents(
    server_url: str,
) -> None:
    """The existing row is found by its unique slug, not by the key the statement carries.

    PostgreSQL names the constraint (``ON CONFLICT ON CONSTRAINT``); MariaDB's
    ``ON DUPLICATE KEY UPDATE`` names none, so any unique key may be hit.
    """
    engine = sa.create_engine(server_url)
    try:
        Slugged.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([Writer(id=1), Writer(id=2)])
            s.flush()
            s.add_all([Article(id=1, slug="a", writer_id=1), Article(id=2, slug="b", writer_id=1)])
            s.commit()
            rows = [
                {"id": 50, "slug": "a", "writer_id": 2},  # hits article 1 by its slug
                {"id": 51, "slug": "new", "writer_id": 2},
            ]
            stmt: Any
            if engine.dialect.name == "postgresql":
                ins = postgresql.insert(Article)
                stmt = ins.on_conflict_do_update(
                    constraint="uq_articles_slug", set_={"writer_id": ins.excluded.writer_id}
                )
            else:
                mins = mysql.insert(Article)
                stmt = mins.on_duplicate_key_update(writer_id=mins.inserted.writer_id)
            s.execute(stmt, rows)
            s.commit()
        with engine.connect() as conn:
            cached = dict(conn.execute(sa.select(Writer.id, Writer.articles_count)).all())
            counts = dict(
                conn.execute(
                    sa.text("SELECT writer_id, COUNT(*) FROM articles GROUP BY writer_id")
                ).all()
            )
            ids = conn.execute(sa.text("SELECT id FROM articles ORDER BY id")).scalars().all()
        assert ids == [1, 2, 51]  # article 1 was updated, not duplicated
        assert counts == {1: 1, 2: 2}
        assert cached == {1: 1, 2: 2}
    finally:
        engine.dispose()
