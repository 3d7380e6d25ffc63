"""counter_cache() declarations: the column it makes, and one clear error per mistake."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import CounterDeclarationError, counter_cache, counters_of
from alembic_counterfill.declaration import spec_of

# The declarative registry holds mapped classes weakly: local classes must be held
# here, or a garbage collection between build() and counters_of() loses them.
_HELD: list[type] = []


@pytest.fixture(autouse=True)
def _release_held() -> Any:
    yield
    _HELD.clear()


def build(parent_counter: Callable[[], Any], *, composite: bool = False) -> type:
    """Declare Parent/Child/Other on a fresh base; the counter comes from parent_counter()."""

    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        if composite:
            id2: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = parent_counter()

    class Child(Base):
        __tablename__ = "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("parents.id"))
        other_id: Mapped[int | None] = mapped_column(sa.ForeignKey("others.id"))
        plain_id: Mapped[int | None]
        label: Mapped[str | None] = mapped_column(sa.String(10))
        amount: Mapped[int] = mapped_column(default=0)

    class Other(Base):
        __tablename__ = "others"
        id: Mapped[int] = mapped_column(primary_key=True)

    _HELD.extend([Base, Parent, Child, Other])
    return Base


def configure_error(parent_counter: Callable[[], Any], **kw: Any) -> str:
    base = build(parent_counter, **kw)
    try:
        with pytest.raises(CounterDeclarationError) as err:
            base.registry.configure()
        return str(err.value)
    finally:
        base.registry.dispose()  # a failed registry must not poison other tests


def test_column_shape_and_key() -> None:
    base = build(lambda: counter_cache("Child.parent_id"))
    try:
        col = base.metadata.tables["parents"].c.n
        assert isinstance(col.type, sa.Integer) and not isinstance(col.type, sa.BigInteger)
        assert col.nullable is False
        assert col.server_default is not None and str(col.server_default.arg) == "0"
        assert spec_of(col) is not None
        [counter] = counters_of(base)
        assert counter.key == "parents.n"
        assert counter.fk is base.metadata.tables["children"].c.parent_id
        assert counter.child_table.name == "children"
    finally:
        base.registry.dispose()


def test_sum_defaults_to_bigint_and_type_override() -> None:
    base = build(lambda: counter_cache("Child.parent_id", sum="amount"))
    try:
        assert isinstance(base.metadata.tables["parents"].c.n.type, sa.BigInteger)
        [counter] = counters_of(base)
        assert counter.summed is base.metadata.tables["children"].c.amount
    finally:
        base.registry.dispose()
    base = build(lambda: counter_cache("Child.parent_id", type_=sa.SmallInteger()))
    try:
        assert isinstance(base.metadata.tables["parents"].c.n.type, sa.SmallInteger)
    finally:
        base.registry.dispose()


def test_unknown_class() -> None:
    msg = configure_error(lambda: counter_cache("Nope.parent_id"))
    assert msg.startswith("Parent.n:") and "unknown class 'Nope'" in msg
    assert "same declarative base" in msg


def test_unknown_attribute() -> None:
    msg = configure_error(lambda: counter_cache("Child.missing"))
    assert "Parent.n:" in msg and "Child has no column attribute 'missing'" in msg


def test_fk_not_referencing_parent() -> None:
    msg = configure_error(lambda: counter_cache("Child.other_id"))
    assert "Child.other_id has no ForeignKey to parents.id" in msg
    assert 'ForeignKey("parents.id")' in msg
    msg = configure_error(lambda: counter_cache("Child.plain_id"))
    assert "Child.plain_id has no ForeignKey to parents.id" in msg


def test_non_numeric_sum() -> None:
    msg = configure_error(lambda: counter_cache("Child.parent_id", sum="label"))
    assert "Parent.n:" in msg and "sum='label' is not numeric" in msg
    assert "Integer or Numeric" in msg


def test_sum_of_unknown_attribute() -> None:
    msg = configure_error(lambda: counter_cache("Child.parent_id", sum="nothing"))
    assert "sum='nothing' is not a column of Child" in msg


def test_composite_parent_key_not_supported() -> None:
    msg = configure_error(lambda: counter_cache("Child.parent_id"), composite=True)
    assert "composite primary keys on the parent are not supported yet" in msg


def test_where_must_be_sql() -> None:
    msg = configure_error(lambda: counter_cache("Child.parent_id", where=lambda: True))
    assert "where= returned bool, not a SQL expression" in msg


def test_target_callable_must_return_attribute() -> None:
    msg = configure_error(lambda: counter_cache(lambda: 42))
    assert "did not return a mapped attribute" in msg


def test_malformed_target_string() -> None:
    msg = configure_error(lambda: counter_cache("parent_id"))
    assert "is not 'Child.fk_attribute'" in msg


def test_bad_arguments_fail_at_declaration() -> None:
    with pytest.raises(TypeError, match="zero-argument callable"):
        counter_cache("Child.parent_id", where="published")  # type: ignore[arg-type]
