"""The library's Hypothesis state machine with bulk-statement rules, on SQLite and PostgreSQL.

Random ORM traffic (the base machine's rules) interleaves with bulk INSERT,
DELETE, UPDATE by WHERE, UPDATE by primary key and upserts run through
``Session.execute``. After every commit, and at every step for committed
data, each counter must equal the test's own GROUP BY truth.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from hypothesis import strategies as st
from hypothesis.stateful import rule
from social import Post, SocialMachine, User
from sqlalchemy.dialects import mysql, postgresql, sqlite

from alembic_counterfill import exercised as ex
from alembic_counterfill.counters import Counter

INDEX = st.integers(min_value=0, max_value=10_000)
PICKS = st.lists(INDEX, min_size=1, max_size=4)
SYNC = st.sampled_from(["auto", "fetch", "evaluate", False])


class BulkMachine(SocialMachine):
    """The library's machine on the social models, plus bulk-statement rules."""

    # Bulk rules take most steps here; the ORM writes are held to a quarter of the base
    # minimum (tests/test_live_hypothesis.py holds them to the full one).
    min_per_example = 0.25

    def _required(self) -> list[tuple[str, str]]:
        # Moves, deletes and flips by ORM writes are held to the full minimum by
        # tests/test_live_hypothesis.py; here bulk rules take most steps (each bulk kind
        # is required below), so a rarely-deleted self-referential child (a user
        # referred by a user) must not fail the run for want of ORM deletes.
        kinds = {ex.INSERTED, ex.NONZERO, ex.STALE}
        return [pair for pair in super()._required() if pair[1] in kinds]

    # --- helpers -----------------------------------------------------------------------------

    def _counter(self, which: int) -> Counter:
        return self.counters[which % len(self.counters)]

    def _parent_ids(self, counter: Counter, picks: list[int]) -> list[Any]:
        ids = [self._parent_id(counter, i, self.session) for i in picks]
        return sorted({x for x in ids if x is not None})

    def _fk(self, counter: Counter) -> Any:
        return getattr(counter.child_mapper.class_, self._attr(counter.child_mapper, counter.fk))

    def _run(self, stmt: Any, params: Any = None, sync: object = "auto") -> None:
        """Run a bulk statement; tally it (per kind) when it touched rows and was committed."""
        options = {"synchronize_session": sync} if not isinstance(stmt, sa.Insert) else {}
        result: list[Any] = []

        def execute() -> None:
            result.append(self.session.execute(stmt, params, execution_options=options))

        if self._guard(self.session, execute) and result:
            rowcount = getattr(result[0], "rowcount", -1)
            if rowcount is None or rowcount != 0:
                kind = f"{ex.BULK}: {type(stmt).__name__.lower()}"
                self._note(self.session, [("*", kind)])

    # --- bulk rules --------------------------------------------------------------------------

    @rule(which=INDEX, picks=PICKS, n=st.integers(1, 5), data=st.data())
    def bulk_insert(self, which: int, picks: list[int], n: int, data: st.DataObject) -> None:
        child = self._counter(which).child_mapper
        siblings = [c for c in self.counters if c.child_mapper is child]
        rows = []
        for r in range(n):
            row: dict[str, Any] = {}
            for i, c in enumerate(siblings):
                pid = self._parent_id(c, picks[(r + i) % len(picks)] + r, self.session)
                if pid is None:
                    return
                row[self._attr(child, c.fk)] = pid
                for col in self._watched(c):
                    value = self._random_value(col, data)
                    if value is not None:
                        row[self._attr(child, col)] = value
            rows.append(row)
        if child.class_ is User:
            for row in rows:
                row["name"] = "b"
        self._run(sa.insert(child.class_), rows)

    @rule(which=INDEX, picks=PICKS, sync=SYNC)
    def bulk_delete_by_parent(self, which: int, picks: list[int], sync: object) -> None:
        counter = self._counter(which)
        ids = self._parent_ids(counter, picks)
        if ids:
            self._run(
                sa.delete(counter.child_mapper.class_).where(self._fk(counter).in_(ids)), sync=sync
            )

    @rule(which=INDEX, data=st.data(), sync=SYNC)
    def bulk_delete_by_value(self, which: int, data: st.DataObject, sync: object) -> None:
        counter = self._counter(which)
        cols = self._watched(counter)
        if cols:
            col = getattr(counter.child_mapper.class_, self._attr(counter.child_mapper, cols[0]))
            value = self._random_value(cols[0], data)
            self._run(sa.delete(counter.child_mapper.class_).where(col == value), sync=sync)

    @rule(which=INDEX, src=INDEX, dest=INDEX, sync=SYNC)
    def bulk_move(self, which: int, src: int, dest: int, sync: object) -> None:
        counter = self._counter(which)
        a = self._parent_id(counter, src, self.session)
        b = self._parent_id(counter, dest, self.session)
        if a is not None:
            fk = self._fk(counter)
            stmt = sa.update(counter.child_mapper.class_).where(fk == a).values({fk: b})
            self._run(stmt, sync=sync)

    @rule(which=INDEX, src=INDEX, data=st.data(), sync=SYNC)
    def bulk_flip(self, which: int, src: int, data: st.DataObject, sync: object) -> None:
        counter = self._counter(which)
        cols = self._watched(counter)
        a = self._parent_id(counter, src, self.session)
        if cols and a is not None:
            col = cols[data.draw(st.integers(0, len(cols) - 1))]
            attr = getattr(counter.child_mapper.class_, self._attr(counter.child_mapper, col))
            # Always a change: negate a flag, shift a number (a random value often is the same).
            value = sa.not_(attr) if isinstance(col.type, sa.Boolean) else attr + 3
            stmt = sa.update(counter.child_mapper.class_).where(self._fk(counter) == a)
            self._run(stmt.values({attr: value}), sync=sync)

    @rule(rows=st.lists(st.tuples(INDEX, INDEX, st.integers(-5, 50)), min_size=1, max_size=4))
    def bulk_update_posts_by_pk(self, rows: list[tuple[int, int, int]]) -> None:
        params = []
        for row, dest, likes in rows:
            post = self._pick(self.session, sa.inspect(Post), row)
            author = self._pick(self.session, sa.inspect(User), dest)
            if post is None or author is None:
                return
            params.append({"id": post.id, "author_id": author.id, "likes": likes})
        if len({p["id"] for p in params}) == len(params):
            self._run(sa.update(Post), params)

    @rule(rows=st.lists(st.tuples(INDEX, st.booleans(), st.integers(0, 9)), min_size=1, max_size=4))
    def upsert_posts(self, rows: list[tuple[int, bool, int]]) -> None:
        module = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        params = []
        for i, (dest, published, likes) in enumerate(rows):
            author = self._pick(self.session, sa.inspect(User), dest)
            if author is None:
                return
            # Ids 1..3 collide with existing posts often; the others are usually new.
            params.append(
                {"id": (dest + i) % 6 + 1, "author_id": author.id, "published": published}
            )
            params[-1]["likes"] = likes
        if len({p["id"] for p in params}) != len(params):
            return
        stmt: Any
        if self.engine.dialect.name in ("mysql", "mariadb"):
            mins = mysql.insert(Post)
            stmt = mins.on_duplicate_key_update(
                author_id=mins.inserted.author_id, published=mins.inserted.published
            )
        else:
            ins = module.insert(Post)
            stmt = ins.on_conflict_do_update(
                index_elements=["id"],
                set_={"author_id": ins.excluded.author_id, "published": ins.excluded.published},
            )
        self._run(stmt, params)


def test_random_bulk_and_orm_traffic_keeps_counters_exact(run_machine) -> None:  # noqa: ANN001
    tally = run_machine(BulkMachine, max_examples=8, steps=50)
    # Each kind of bulk statement really touched rows, in committed work, in most examples.
    for kind in ("insert", "delete", "update"):
        assert tally.totals[("*", f"{ex.BULK}: {kind}")] >= tally.examples / 4, tally.report()
