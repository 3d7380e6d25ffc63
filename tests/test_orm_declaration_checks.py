"""Declaration mistakes fail every configuration; where=/sum= stay on the child; sum types."""

from __future__ import annotations

import decimal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from alembic_counterfill import CounterDeclarationError, counter_cache, counters_of
from alembic_counterfill.errors import CounterfillWarning


def two_counters(make_bad: Callable[[], Any]) -> type:
    """A valid counter declared before an invalid one, on a fresh base."""

    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        good: Mapped[int] = counter_cache("Child.parent_id")
        bad: Mapped[int] = make_bad()

    class Child(Base):
        __tablename__ = "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("parents.id"))

    Base.classes = (Parent, Child)  # type: ignore[attr-defined]  # keep them alive
    return Base


def test_declaration_error_fails_every_configuration() -> None:
    base = two_counters(lambda: counter_cache("Child.nope"))
    try:
        for _ in range(3):  # the next request, the next test: still failing
            with pytest.raises(CounterDeclarationError, match=r"Parent\.bad"):
                base.registry.configure()
        with pytest.raises(CounterDeclarationError, match=r"Parent\.bad"):
            counters_of(base)
        engine = sa.create_engine("sqlite://")
        base.metadata.create_all(engine)
        parent_cls, child_cls = base.classes  # type: ignore[attr-defined]
        # A session after the failure never runs with unmaintained counters.
        with Session(engine) as s, pytest.raises(CounterDeclarationError, match=r"Parent\.bad"):
            s.add(parent_cls(id=1))
            s.add(child_cls(parent_id=1))
            s.flush()
        with Session(engine) as s, pytest.raises(CounterDeclarationError):
            s.execute(sa.insert(child_cls), [{"parent_id": 1}])
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM children")).scalar() == 0
    finally:
        base.registry.dispose()


def test_fixed_declaration_configures() -> None:
    # Declaring the missing piece later (a late import) lets the next configuration succeed.
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = counter_cache("Late.parent_id")

    try:
        with pytest.raises(CounterDeclarationError, match="unknown class 'Late'"):
            Base.registry.configure()

        class Late(Base):
            __tablename__ = "late"
            id: Mapped[int] = mapped_column(primary_key=True)
            parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("parents.id"))

        [counter] = counters_of(Base)
        assert counter.key == "parents.n"
        engine = sa.create_engine("sqlite://")
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add(Parent(id=1))
            s.add_all([Late(parent_id=1), Late(parent_id=1)])
            s.commit()
            assert s.get(Parent, 1).n == 2  # type: ignore[union-attr]
    finally:
        Base.registry.dispose()


def other_table_base(kind: str) -> type:
    class Base(DeclarativeBase):
        pass

    class Category(Base):
        __tablename__ = "categories"
        id: Mapped[int] = mapped_column(primary_key=True)
        public: Mapped[bool] = mapped_column(default=True)
        weight: Mapped[int] = mapped_column(default=1)

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        if kind == "where":
            n: Mapped[int] = counter_cache("Child.parent_id", where=lambda: Category.public)
        else:
            n: Mapped[int] = counter_cache("Child.parent_id", sum=lambda: Category.weight)

    class Child(Base):
        __tablename__ = "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("parents.id"))
        category_id: Mapped[int | None] = mapped_column(sa.ForeignKey("categories.id"))

    Base.classes = (Category, Parent, Child)  # type: ignore[attr-defined]  # keep them alive
    return Base


@pytest.mark.parametrize("kind", ["where", "sum"])
def test_where_and_sum_over_another_table_are_refused(kind: str) -> None:
    base = other_table_base(kind)
    try:
        with pytest.raises(CounterDeclarationError) as err:
            base.registry.configure()
        msg = str(err.value)
        assert msg.startswith("Parent.n:")
        assert "categories" in msg and "Child" in msg
        assert "\n" not in msg
    finally:
        base.registry.dispose()


def test_passive_deletes_with_database_cascade_warns() -> None:
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = counter_cache("Child.owner_id")

    class Owner(Base):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True)
        children: Mapped[list[Child]] = relationship(passive_deletes=True)

    class Child(Base):
        __tablename__ = "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[int | None] = mapped_column(
            sa.ForeignKey("owners.id", ondelete="CASCADE"), sa.ForeignKey("parents.id")
        )

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Base.registry.configure()
        msgs = [str(w.message) for w in caught if issubclass(w.category, CounterfillWarning)]
        assert any("ON DELETE CASCADE" in m and "Parent.n" in m for m in msgs), msgs
    finally:
        Base.registry.dispose()


def sum_base(summed_type: Any) -> type:
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        total = counter_cache("Child.parent_id", sum="amount")

    class Child(Base):
        __tablename__ = "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("parents.id"))
        amount = mapped_column(summed_type, nullable=True)

    Base.classes = (Parent, Child)  # type: ignore[attr-defined]  # keep them alive
    return Base


@pytest.mark.parametrize(
    ("summed", "expect"),
    [
        (sa.Numeric(12, 2), (sa.Numeric, 12, 2)),
        (sa.Float(), (sa.Float, None, None)),
        (sa.Integer(), (sa.BigInteger, None, None)),
        (sa.SmallInteger(), (sa.BigInteger, None, None)),
    ],
    ids=["numeric", "float", "integer", "smallint"],
)
def test_sum_default_type_follows_summed_column(summed: Any, expect: tuple[Any, ...]) -> None:
    base = sum_base(summed)
    try:
        base.registry.configure()  # the summed column is known once mappers are configured
        col = base.metadata.tables["parents"].c.total
        cls, precision, scale = expect
        assert isinstance(col.type, cls)
        if cls is sa.Numeric:
            assert not isinstance(col.type, sa.Float)
            assert (col.type.precision, col.type.scale) == (precision, scale)
        if cls is sa.Float:
            assert isinstance(col.type, sa.Float)
    finally:
        base.registry.dispose()


@pytest.fixture
def numeric_base() -> Iterator[type]:
    base = sum_base(sa.Numeric(12, 2))
    yield base
    base.registry.dispose()


def test_numeric_sum_deltas_are_exact(numeric_base: type, db_url: str) -> None:
    engine = sa.create_engine(db_url)
    numeric_base.metadata.create_all(engine)
    parent_cls, child_cls = numeric_base.classes  # type: ignore[attr-defined]
    d = decimal.Decimal
    with Session(engine) as s:
        s.add_all([parent_cls(id=1), parent_cls(id=2)])
        s.commit()
        s.add_all([child_cls(id=i, parent_id=1, amount=d("0.40")) for i in range(1, 6)])
        s.add(child_cls(id=9, parent_id=2, amount=d("10.25")))
        s.commit()
        s.get(child_cls, 1).amount = d("1.05")  # 2.00 + 0.65
        s.get(child_cls, 2).parent_id = 2  # moves 0.40 away
        s.delete(s.get(child_cls, 3))  # - 0.40: 1.85
        s.commit()
        s.execute(sa.insert(child_cls), [{"id": 20, "parent_id": 2, "amount": d("0.01")}])
        s.commit()
    with engine.connect() as conn:
        truth = dict(
            conn.execute(
                sa.text("SELECT parent_id, SUM(amount) FROM children GROUP BY parent_id")
            ).all()
        )
        cached = dict(conn.execute(sa.text("SELECT id, total FROM parents")).all())
    assert {k: d(str(v)).quantize(d("0.01")) for k, v in cached.items()} == {
        k: d(str(v)).quantize(d("0.01")) for k, v in truth.items()
    }
    assert d(str(cached[1])).quantize(d("0.01")) == d("1.85")
    engine.dispose()
