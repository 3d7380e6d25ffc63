"""Hypothesis collection rules over association tables, judged by an independent COUNT(*).

Random appends, removes, replacements, clears, set adds/discards, both sides
of the backref, statements through the session, deletes of either side,
writes from a stale session and merges of detached objects, with flushes,
commits and rollbacks in between. (Kept apart from the suite's ORM state
machines, which count mapped child classes.)
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from assoc_models import Base, Post, Tag, User, assert_exact, followers, post_tags
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

INDEX = st.integers(min_value=0, max_value=1000)
COUNTER_ATTRS = [
    User.followers_count,
    User.following_count,
    User.accepted_followers,
    User.follower_weight,
]


def _foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class AssocMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.engine = sa.create_engine(self.url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _foreign_keys)
        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as s:
            s.add_all([User(id=i) for i in range(1, 6)] + [Post(id=i) for i in range(1, 4)])
            s.add_all([Tag(id=i) for i in range(1, 4)])
            s.commit()
        self.session = Session(self.engine)
        self.stale = Session(self.engine)
        self.detached: list[User] = []

    def teardown(self) -> None:
        self.session.close()
        self.stale.close()
        Base.metadata.drop_all(self.engine)
        self.engine.dispose()

    # --- helpers ---------------------------------------------------------------------------

    def _pick(self, session: Session, cls: type, index: int) -> Any:
        with session.no_autoflush:
            rows = session.scalars(sa.select(cls).order_by(cls.id)).all()  # type: ignore[attr-defined]
        return rows[index % len(rows)] if rows else None

    def _guard(self, session: Session, action: Any) -> None:
        try:
            action()
            session.flush()
        except (sa.exc.IntegrityError, StaleDataError, ValueError):
            session.rollback()

    def _commit(self, session: Session) -> None:
        try:
            session.commit()
        except (sa.exc.IntegrityError, StaleDataError):
            session.rollback()
        self._check()

    def _check(self) -> None:
        if self.engine.dialect.name == "sqlite" and (
            self.session.in_transaction() or self.stale.in_transaction()
        ):
            return  # SQLite: a fresh connection cannot read while a session writes
        assert_exact(self.engine)

    # --- user collections ------------------------------------------------------------------

    @rule(a=INDEX, b=INDEX, other_side=st.booleans())
    def follow(self, a: int, b: int, other_side: bool) -> None:
        x, y = self._pick(self.session, User, a), self._pick(self.session, User, b)
        if x is None or y is None:
            return
        collection, item = (y.followers, x) if other_side else (x.following, y)
        if item not in collection:
            self._guard(self.session, lambda: collection.append(item))

    @rule(a=INDEX, b=INDEX, other_side=st.booleans())
    def unfollow(self, a: int, b: int, other_side: bool) -> None:
        x, y = self._pick(self.session, User, a), self._pick(self.session, User, b)
        if x is None or y is None:
            return
        collection, item = (y.followers, x) if other_side else (x.following, y)
        if item in collection:
            self._guard(self.session, lambda: collection.remove(item))

    @rule(a=INDEX, picks=st.lists(INDEX, max_size=4))
    def replace_following(self, a: int, picks: list[int]) -> None:
        x = self._pick(self.session, User, a)
        if x is None:
            return
        new = list({id(u): u for u in (self._pick(self.session, User, p) for p in picks)}.values())
        self._guard(self.session, lambda: setattr(x, "following", new))

    @rule(a=INDEX, other_side=st.booleans())
    def clear(self, a: int, other_side: bool) -> None:
        x = self._pick(self.session, User, a)
        if x is not None:
            self._guard(self.session, (x.followers if other_side else x.following).clear)

    @rule(a=INDEX)
    def delete_user(self, a: int) -> None:
        x = self._pick(self.session, User, a)
        if x is not None:
            self._guard(self.session, lambda: self.session.delete(x))

    @rule()
    def add_user(self) -> None:
        self._guard(self.session, lambda: self.session.add(User()))

    # --- set collections (post_tags has no primary key) ------------------------------------

    @rule(p=INDEX, t=INDEX, add=st.booleans())
    def tag(self, p: int, t: int, add: bool) -> None:
        post, tag = self._pick(self.session, Post, p), self._pick(self.session, Tag, t)
        if post is not None and tag is not None:
            action = post.tags.add if add else post.tags.discard
            self._guard(self.session, lambda: action(tag))

    @rule(p=INDEX, picks=st.lists(INDEX, max_size=3))
    def retag(self, p: int, picks: list[int]) -> None:
        post = self._pick(self.session, Post, p)
        if post is not None:
            tags = {self._pick(self.session, Tag, i) for i in picks}
            self._guard(self.session, lambda: setattr(post, "tags", tags))

    # --- statements through the session ----------------------------------------------------

    @rule(a=INDEX, b=INDEX)
    def insert_statement(self, a: int, b: int) -> None:
        x, y = self._pick(self.session, User, a), self._pick(self.session, User, b)
        if x is None or y is None:
            return
        self._guard(
            self.session,
            lambda: self.session.execute(
                sa.insert(followers), [{"follower_id": x.id, "followed_id": y.id}]
            ),
        )

    @rule(b=INDEX)
    def delete_statement(self, b: int) -> None:
        y = self._pick(self.session, User, b)
        if y is not None:
            stmt = sa.delete(followers).where(followers.c.followed_id == y.id)
            self._guard(self.session, lambda: self.session.execute(stmt))

    @rule(a=INDEX, accepted=st.booleans())
    def flip_accepted(self, a: int, accepted: bool) -> None:
        x = self._pick(self.session, User, a)
        if x is not None:
            stmt = (
                sa.update(followers)
                .where(followers.c.follower_id == x.id)
                .values(accepted=accepted, weight=sa.func.length(str(x.id)) + 1)
            )
            self._guard(self.session, lambda: self.session.execute(stmt))

    @rule(p=INDEX)
    def untag_statement(self, p: int) -> None:
        post = self._pick(self.session, Post, p)
        if post is not None:
            stmt = sa.delete(post_tags).where(post_tags.c.post_id == post.id)
            self._guard(self.session, lambda: self.session.execute(stmt))

    # --- stale and detached copies ---------------------------------------------------------

    @rule()
    def load_stale(self) -> None:
        """Load users and their follows into the second session, to be written later, stale."""
        self._commit(self.session)
        for u in self.stale.scalars(sa.select(User)).all():
            _ = list(u.following)
        self.stale.commit()  # objects stay in its identity map, expired on next access

    @rule(a=INDEX, b=INDEX)
    def stale_unfollow(self, a: int, b: int) -> None:
        self._commit(self.session)  # SQLite: one writer at a time
        users = list(self.stale.identity_map.values())
        users = [u for u in users if isinstance(u, User)]
        if not users:
            return
        x = users[a % len(users)]
        with self.stale.no_autoflush:
            try:
                following = list(x.following)
            except sa.exc.InvalidRequestError:  # deleted since
                return
        if following:
            y = following[b % len(following)]
            self._guard(self.stale, lambda: x.following.remove(y))
        self._commit(self.stale)

    @rule(a=INDEX, b=INDEX)
    def detach(self, a: int, b: int) -> None:
        """Read a user with its follows, detach it, and change its collection while detached."""
        x, y = self._pick(self.session, User, a), self._pick(self.session, User, b)
        if x is None or y is None:
            return
        self._commit(self.session)
        with Session(self.engine) as reader:
            u = reader.get(User, x.id)
            other = reader.get(User, y.id)
            if u is None or other is None:
                return
            _ = list(u.following)
            # Carry no counter values: merging a stale copy's counters back is the
            # read-only-counter-columns work of issue 11, not association tables'.
            for obj in list(reader.identity_map.values()):
                reader.expire(obj, [a.key for a in COUNTER_ATTRS])
            reader.expunge_all()
        if other in u.following:
            u.following.remove(other)
        else:
            u.following.append(other)
        self.detached.append(u)

    @rule()
    def merge_detached(self) -> None:
        if self.detached:
            u = self.detached.pop()
            self._guard(self.session, lambda: self.session.merge(u))

    # --- transaction control ---------------------------------------------------------------

    @rule()
    def flush(self) -> None:
        self._guard(self.session, lambda: None)

    @rule()
    def commit(self) -> None:
        self._commit(self.session)

    @rule()
    def rollback(self) -> None:
        self.session.rollback()

    @invariant()
    def committed_counters_are_exact(self) -> None:
        self._check()


def test_random_collection_traffic_keeps_association_counters_exact(db_url: str) -> None:
    # Run directly: the suite's run_machine fixture drives CounterStateMachine
    # subclasses (with their exercised-effects tally), which this machine is not.
    bound = type("AssocMachine", (AssocMachine,), {"url": db_url})
    run_state_machine_as_test(
        bound,
        settings=settings(
            max_examples=20,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
