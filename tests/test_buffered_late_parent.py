"""MariaDB: a child whose buffered parent is known only through the parent's collection.

``idol.fanships.append(Fanship(fan_id=5))`` (a one-to-many without a
many-to-one back) leaves the child's FK empty until the unit of work syncs it
during the flush. The flush's up-front lock pass (parents in key order, before
any child write) must still see parent 1 there, not only at the child
INSERT's foreign-key check: by then the writer holds user 5 (the unbuffered
``fan_of_count``), and a fold, which locks parents exclusively in key order,
could hold 1 and wait for 5. A third connection plays that fold: it holds 1;
once the writer waits, it asks for 5, which it must get at once. Judged by
COUNT(*) after both commit.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from races import Racer, holding, race_engine, wait_blocked
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from alembic_counterfill import counter_cache, counters_of
from alembic_counterfill import fold as folding

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_inline_folding")]


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(primary_key=True)
    fans_count: Mapped[int] = counter_cache("Fanship.idol_id", buffered=True)
    fan_of_count: Mapped[int] = counter_cache("Fanship.fan_id")
    # One-to-many, no many-to-one back: the child's idol_id is set only by the flush.
    fanships: Mapped[list[Fanship]] = relationship(
        primaryjoin="Member.id == Fanship.idol_id", foreign_keys="Fanship.idol_id"
    )


class Fanship(Base):
    __tablename__ = "fanships"
    id: Mapped[int] = mapped_column(primary_key=True)
    fan_id: Mapped[int] = mapped_column(sa.ForeignKey("members.id"), index=True)
    idol_id: Mapped[int | None] = mapped_column(sa.ForeignKey("members.id"), index=True)


TRUTH = sa.text(
    "SELECT m.id, m.fans_count + coalesce((SELECT sum(d.fans_count) FROM "
    "counterfill_deltas_members d WHERE d.parent_id = m.id), 0), "
    "(SELECT count(*) FROM fanships f WHERE f.idol_id = m.id), "
    "m.fan_of_count, (SELECT count(*) FROM fanships f WHERE f.fan_id = m.id) FROM members m"
)


def test_a_parent_named_only_by_its_collection_is_locked_up_front(mariadb_url: str) -> None:
    engine = race_engine(mariadb_url)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([Member(id=i) for i in range(1, 7)])
            s.commit()

        def write() -> None:
            with Session(engine) as s:
                s.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 20")
                idol = s.get(Member, 1)
                assert idol is not None
                idol.fanships.append(Fanship(fan_id=5))
                s.commit()

        with holding(engine, "SELECT id FROM members WHERE id = 1 FOR UPDATE") as fold_conn:
            fold_conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 5")
            writer = Racer(write, "writer").start()
            wait_blocked(engine, 1, writer)
            # The fold's next parent: granted at once when the writer holds nothing on it.
            fold_conn.execute(sa.text("SELECT id FROM members WHERE id = 5 FOR UPDATE")).all()
        writer.join()
        folding.fold(engine, counters_of(Base))
        with engine.connect() as conn:
            rows = conn.execute(TRUTH).all()
        assert [r for r in rows if r[1] != r[2] or r[3] != r[4]] == []
        assert {r[0]: r[2] for r in rows}[1] == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("write", ["orm-flip", "orm-delete", "bulk-update"])
def test_a_child_write_without_fk_check_locks_its_parent_before_the_delta(
    mariadb_url: str, write: str
) -> None:
    """A child UPDATE/DELETE of one hot parent waits for a fold before writing any delta row.

    Such a write takes no foreign-key lock on its parent. A third connection
    plays a fold (holds the parent, then reads its delta rows with a locking
    read, as ``innodb_deltas.fold_locked`` does): the read must return at once and
    both must finish exact. This passed on the code before the writer took the
    parent's shared lock up front too (the deadlock that change removed was
    seen only with real workers, tests/test_buffered_concurrency.py); it stays
    as a guard of the lock order.
    """
    from buffered_models import Base as PostsBase
    from buffered_models import Post, User, drift

    engine = race_engine(mariadb_url)
    try:
        PostsBase.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([User(id=i) for i in (1, 2)])
            s.commit()
            s.add(Post(id=1, author_id=1, published=True, likes=3))
            s.commit()

        def writer_tx() -> None:
            with Session(engine) as s:
                s.connection().exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 20")
                if write == "bulk-update":
                    s.execute(sa.update(Post).where(Post.id == 1).values(published=False))
                else:
                    post = s.get(Post, 1)
                    assert post is not None
                    if write == "orm-flip":
                        post.published = False
                    else:
                        s.delete(post)
                s.commit()

        with holding(engine, "SELECT id FROM users WHERE id = 1 FOR UPDATE") as fold_conn:
            fold_conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 5")
            writer = Racer(writer_tx, "writer").start()
            wait_blocked(engine, 1, writer)
            # The fold's locking read of the parent's delta rows (fold_locked's form).
            fold_conn.execute(
                sa.text("SELECT id FROM counterfill_deltas_users WHERE parent_id = 1 FOR UPDATE")
            ).all()
        writer.join()
        assert drift(engine) == []
    finally:
        engine.dispose()
