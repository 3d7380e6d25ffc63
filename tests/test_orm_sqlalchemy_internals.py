"""The SQLAlchemy internals the library still relies on, checked so a change fails loudly.

Each test names the library code that depends on the internal and why no
public API replaces it (see docs/architecture.md, "SQLAlchemy internals").
Runs on the installed SQLAlchemy, so ``make test-oldest`` checks the floor.
"""

from __future__ import annotations

import inspect

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import ColumnProperty, DeclarativeBase, Mapped, Session, mapped_column

from alembic_counterfill import CounterDeclarationError, counter_cache
from alembic_counterfill.readonly import CounterColumnProperty

pytestmark = pytest.mark.timeout(60)


def _failing_base() -> tuple[type, type]:
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = counter_cache("Nowhere.parent_id")

    return Base, Parent


def test_failed_configuration_internals() -> None:
    """counters.resolve_mapper/retry_failed rely on three mapper and registry internals.

    ``_configure_failed``, ``_new_mappers`` and writing ``configured``:
    SQLAlchemy marks a mapper configured before its ``mapper_configured`` hook
    and records a hook's exception in ``mapper._configure_failed``; no public
    API marks a registry as needing configuration again, and the issue asks
    that every configuration fail until the declaration is fixed.
    """
    base, parent = _failing_base()
    try:
        with pytest.raises(CounterDeclarationError):
            base.registry.configure()
        mapper = sa.inspect(parent)
        reg = base.registry
        assert isinstance(getattr(reg, "_new_mappers", None), bool), (
            "SQLAlchemy dropped registry._new_mappers: update counters.resolve_mapper"
        )
        assert reg._new_mappers is True, "resolve_mapper no longer re-arms configuration"
        assert mapper.configured is False, "Mapper.configured is no longer writable"
        assert isinstance(mapper.__dict__.get("_configure_failed"), CounterDeclarationError), (
            "SQLAlchemy no longer records a hook's error in mapper._configure_failed: "
            "update counters.retry_failed"
        )
        # The second configuration fails with the declaration's own message, not
        # SQLAlchemy's generic "One or more mappers failed to initialize".
        with pytest.raises(CounterDeclarationError, match=r"Parent\.n"):
            base.registry.configure()
    finally:
        base.registry.dispose()


def test_legacy_bulk_method_signatures() -> None:
    """legacy_bulk patches Session methods (they fire no event): their signatures must hold."""
    expected = {
        "bulk_insert_mappings": ["self", "mapper", "mappings", "return_defaults", "render_nulls"],
        "bulk_update_mappings": ["self", "mapper", "mappings"],
        "bulk_save_objects": [
            "self",
            "objects",
            "return_defaults",
            "update_changed_only",
            "preserve_order",
        ],
    }
    for name, params in expected.items():
        method = getattr(Session, name)
        assert getattr(method, "_counterfill", False), f"Session.{name} is not routed"
        original = inspect.unwrap(method)
        got = list(inspect.signature(original).parameters)
        assert got == params, f"SQLAlchemy changed Session.{name}{got}: update legacy_bulk"


def test_counter_property_class_swap() -> None:
    """readonly.protect swaps a ColumnProperty's class (no merge event exists) to skip merge()."""

    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        n: Mapped[int] = counter_cache("Child.parent_id")

    class Child(Base):
        __tablename__ = "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("parents.id"))

    try:
        base_params = list(inspect.signature(ColumnProperty.merge).parameters)
        assert base_params[:3] == ["self", "session", "source_state"], (
            f"SQLAlchemy changed ColumnProperty.merge{base_params}: update readonly"
        )
        assert CounterColumnProperty.__slots__ == ()  # same layout: the swap is safe
        Base.registry.configure()
        assert type(sa.inspect(Parent).get_property("n")) is CounterColumnProperty
        assert type(sa.inspect(Parent).get_property("id")) is ColumnProperty
        assert Child  # keep the child class alive until the end
    finally:
        Base.registry.dispose()


def test_deep_deannotate_strips_orm_entities() -> None:
    """inheritance.plain: ``_deep_deannotate`` (no public API drops ORM annotations)."""
    from inheritance_models import Comment

    from alembic_counterfill.inheritance import plain

    expr = Comment.flagged.is_(True)
    col = next(e for e in sa.sql.visitors.iterate(expr) if isinstance(e, sa.Column))
    assert col._annotations.get("parententity") is not None
    stripped = plain(expr.__clause_element__() if hasattr(expr, "__clause_element__") else expr)
    cols = [e for e in sa.sql.visitors.iterate(stripped) if isinstance(e, sa.Column)]
    assert cols and all(not c._annotations for c in cols), "deannotation kept ORM entities"


def test_statement_attributes_read_by_bulk_handlers() -> None:
    """bulk_insert/bulk_modify read statement internals that have no public accessor."""
    ins = postgresql.insert(sa.table("t", sa.column("a"))).values(a=1)
    upsert = ins.on_conflict_do_nothing()
    upd = sa.update(sa.table("t", sa.column("a"))).values(a=2).where(sa.true())
    checks = {
        "Insert._values": (ins, "_values"),
        "Insert._multi_values": (ins, "_multi_values"),
        "Insert._select_names": (ins, "_select_names"),
        "Insert._prefixes": (ins, "_prefixes"),
        "Insert._post_values_clause": (upsert, "_post_values_clause"),
        "Update._with_options": (upd, "_with_options"),
        "Update._returning": (upd, "_returning"),
        "Update._return_defaults": (upd, "_return_defaults"),
        "Update._where_criteria": (upd, "_where_criteria"),
    }
    missing = [name for name, (stmt, attr) in checks.items() if not hasattr(stmt, attr)]
    assert not missing, f"SQLAlchemy changed statement internals {missing}: update bulk_*"
    assert upsert._post_values_clause is not None
    assert upd._where_criteria and upd._values
