"""Declaring counters over plain association tables, and the errors and warnings about them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alembic_counterfill import CounterDeclarationError, counter_cache, counters_of
from alembic_counterfill.errors import CounterfillWarning


def build(
    counter: Callable[[sa.Table], Any],
    *,
    passive_deletes: bool = False,
    ondelete: str | None = None,
) -> type[DeclarativeBase]:
    """Users followed through a plain ``followers`` table; the counter comes from ``counter``."""

    class Base(DeclarativeBase):
        pass

    followers = sa.Table(
        "followers",
        Base.metadata,
        sa.Column("follower_id", sa.ForeignKey("users.id", ondelete=ondelete), primary_key=True),
        sa.Column("followed_id", sa.ForeignKey("users.id", ondelete=ondelete), primary_key=True),
        sa.Column("accepted", sa.Boolean, default=True),
        sa.Column("note", sa.String(20)),
        sa.Column("weight", sa.Integer, default=1),
        sa.Column("other_id", sa.Integer),
    )

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = counter(followers)
        following: Mapped[list[User]] = relationship(  # noqa: F821
            secondary=followers,
            primaryjoin=lambda: followers.c.follower_id == User.id,
            secondaryjoin=lambda: followers.c.followed_id == User.id,
            backref="followers",
            passive_deletes=passive_deletes,
        )

    return Base


def resolved(counter: Callable[[sa.Table], Any], **kw: Any) -> Any:
    base = build(counter, **kw)
    try:
        [c] = counters_of(base)
        return c
    finally:
        base.registry.dispose()


def error(counter: Callable[[sa.Table], Any]) -> str:
    base = build(counter)
    try:
        with pytest.raises(CounterDeclarationError) as err:
            base.registry.configure()
        return str(err.value)
    finally:
        base.registry.dispose()


def test_callable_returning_a_table_column() -> None:
    c = resolved(lambda t: counter_cache(lambda: t.c.followed_id))
    assert c.key == "users.n" and c.child_table.name == "followers" and c.child_mapper is None
    assert c.fk.name == "followed_id"


def test_string_naming_a_table_in_the_parents_metadata() -> None:
    c = resolved(lambda t: counter_cache("followers.follower_id"))
    assert c.child_table.name == "followers" and c.fk.name == "follower_id"


def test_where_and_sum_over_the_association_tables_own_columns() -> None:
    c = resolved(
        lambda t: counter_cache(
            "followers.followed_id", where=lambda: t.c.accepted.is_(True), sum="weight"
        )
    )
    assert c.where is not None and c.summed.name == "weight"
    c = resolved(lambda t: counter_cache("followers.followed_id", sum=lambda: t.c.weight))
    assert c.summed.name == "weight"


def test_a_mapped_class_name_wins_over_a_table_name() -> None:
    class Base(DeclarativeBase):
        pass

    sa.Table("Link", Base.metadata, sa.Column("parent_id", sa.Integer))  # plain table "Link"

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = counter_cache("Link.parent_id")

    class Link(Base):  # the class "Link", mapped onto another table
        __tablename__ = "links"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(sa.ForeignKey("parents.id"))

    try:
        [c] = counters_of(Base)
        assert c.child_mapper is sa.inspect(Link) and c.child_table.name == "links"
    finally:
        Base.registry.dispose()


def test_a_table_mapped_by_a_class_resolves_to_the_class() -> None:
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = counter_cache("follow_rows.parent_id")

    class Follow(Base):
        __tablename__ = "follow_rows"
        id: Mapped[int] = mapped_column(primary_key=True)
        owner: Mapped[int] = mapped_column("parent_id", sa.ForeignKey("parents.id"))

    try:
        [c] = counters_of(Base)
        assert c.child_mapper is sa.inspect(Follow) and c.fk.name == "parent_id"
    finally:
        Base.registry.dispose()


def test_errors_say_how_to_name_an_association_table() -> None:
    msg = error(lambda t: counter_cache("nope.followed_id"))
    assert msg.startswith("User.n:") and "unknown class 'nope'" in msg
    assert '"followers.followed_id"' in msg and "lambda: followers.c.followed_id" in msg
    msg = error(lambda t: counter_cache(lambda: 42))
    assert "did not return a mapped attribute or a table column" in msg
    assert "lambda: followers.c.followed_id" in msg


def test_errors_on_association_columns() -> None:
    msg = error(lambda t: counter_cache("followers.missing"))
    assert "followers has no column attribute 'missing'" in msg
    msg = error(lambda t: counter_cache("followers.other_id"))
    assert "followers.other_id has no ForeignKey to users.id" in msg
    msg = error(lambda t: counter_cache("followers.followed_id", sum="note"))
    assert "sum='note' is not numeric" in msg
    msg = error(lambda t: counter_cache("followers.followed_id", sum="nothing"))
    assert "sum='nothing' is not a column of followers" in msg


def test_where_over_another_table_is_refused() -> None:
    msg = error(
        lambda t: counter_cache(
            "followers.followed_id", where=lambda: t.metadata.tables["users"].c.id > 3
        )
    )
    assert "where= reads users, not only the association table followers" in msg
    assert "use only the columns of followers" in msg


def test_warns_when_the_database_cascades_deletes_the_orm_leaves_to_it() -> None:
    with pytest.warns(CounterfillWarning, match="passive_deletes=True.*ON DELETE CASCADE"):
        resolved(
            lambda t: counter_cache("followers.followed_id"),
            passive_deletes=True,
            ondelete="CASCADE",
        )


@pytest.mark.parametrize(("passive", "ondelete"), [(False, "CASCADE"), (True, None)])
def test_no_warning_when_the_orm_deletes_the_rows(passive: bool, ondelete: str | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CounterfillWarning)
        resolved(
            lambda t: counter_cache("followers.followed_id"),
            passive_deletes=passive,
            ondelete=ondelete,
        )
