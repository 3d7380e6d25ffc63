"""Model shapes of a real application (the Flask "Conduit" RealWorld app), written from scratch.

The shapes, as Conduit writes them (its test suite ran with these counters, 2026-12-01):

- ``likes``: an association table with **no primary key**, nullable foreign
  keys and no declared index, behind a ``lazy="dynamic"`` relationship
  (``Article.likers``) whose backref (``Profile.liked``) is a plain list;
- ``follows``: a **self-referential** keyless association table behind a
  dynamic relationship with explicit ``primaryjoin``/``secondaryjoin`` and a
  backref (``followed_by``);
- ``Comment.article_id`` under a dynamic one-to-many collection, and an
  uncounted ``Comment.author_id`` to the same table as a counted parent;
- ``Profile.user_id``: a unique non-key column that Conduit's follow table
  referenced instead of the primary key (refused, with the reason).

Every check is an independent ``SELECT count(*)`` per parent, run on SQLite,
PostgreSQL and MariaDB.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.orm.exc import StaleDataError

from alembic_counterfill import CounterDeclarationError, counter_cache


class Base(DeclarativeBase):
    pass


likes = sa.Table(
    "likes",
    Base.metadata,
    sa.Column("profile_id", sa.Integer, sa.ForeignKey("profiles.id")),
    sa.Column("article_id", sa.Integer, sa.ForeignKey("articles.id")),
)

follows = sa.Table(
    "follows",
    Base.metadata,
    sa.Column("follower", sa.Integer, sa.ForeignKey("profiles.id")),
    sa.Column("followed", sa.Integer, sa.ForeignKey("profiles.id")),
)


class Profile(Base):
    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(unique=True)
    articles_count: Mapped[int] = counter_cache("Article.author_id")
    likes_count: Mapped[int] = counter_cache("likes.profile_id")
    following_count: Mapped[int] = counter_cache("follows.follower")
    followers_count: Mapped[int] = counter_cache(lambda: follows.c.followed)

    follows = relationship(
        "Profile",
        secondary=follows,
        primaryjoin=lambda: Profile.id == follows.c.follower,
        secondaryjoin=lambda: Profile.id == follows.c.followed,
        backref="followed_by",
        lazy="dynamic",
    )


class Article(Base):
    __tablename__ = "articles"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(50), default="t")
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("profiles.id"))
    likes_count: Mapped[int] = counter_cache("likes.article_id")
    comments_count: Mapped[int] = counter_cache("Comment.article_id")

    author = relationship("Profile", backref="articles")
    likers = relationship("Profile", secondary=likes, backref="liked", lazy="dynamic")
    comments = relationship("Comment", backref="article", lazy="dynamic")


class Comment(Base):
    __tablename__ = "comments"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.String(50), default="hi")
    article_id: Mapped[int] = mapped_column(sa.ForeignKey("articles.id"))
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("profiles.id"))  # not counted


#: (parent table, counter column) -> (child table, FK column), written out by hand.
COUNTED = {
    ("profiles", "articles_count"): ("articles", "author_id"),
    ("profiles", "likes_count"): ("likes", "profile_id"),
    ("profiles", "following_count"): ("follows", "follower"),
    ("profiles", "followers_count"): ("follows", "followed"),
    ("articles", "likes_count"): ("likes", "article_id"),
    ("articles", "comments_count"): ("comments", "article_id"),
}


def drift(bind: Any) -> list[tuple[Any, ...]]:
    """Every (table, id, column, cached, count(*)) that differs, from plain SQL."""
    found = []
    for (parent, column), (child, fk) in COUNTED.items():
        rows = bind.execute(
            sa.text(
                f"SELECT p.id, p.{column}, (SELECT count(*) FROM {child} c WHERE c.{fk} = p.id) "
                f"FROM {parent} p ORDER BY p.id"
            )
        ).all()
        found += [(parent, pid, column, cached, n) for pid, cached, n in rows if cached != n]
    return found


def cached(session: Session, table: str, column: str, pk: int) -> int:
    """The stored counter, read with SQL (not through the session's copy)."""
    return session.execute(
        sa.text(f"SELECT {column} FROM {table} WHERE id = :pk"), {"pk": pk}
    ).scalar_one()


def exact(session: Session) -> None:
    session.flush()
    assert drift(session) == []
    session.commit()
    with session.bind.connect() as conn:  # type: ignore[union-attr]
        assert drift(conn) == []


@pytest.fixture
def session(engine: sa.Engine) -> Any:
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", lambda c, _: c.execute("PRAGMA foreign_keys=ON"))
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    Base.metadata.drop_all(engine)


def people(session: Session, n: int) -> list[Profile]:
    found = [Profile(user_id=100 + i) for i in range(n)]
    session.add_all(found)
    session.commit()
    return found


def test_dynamic_secondary_collection_and_its_list_backref(session: Session) -> None:
    a, b, c = people(session, 3)
    one, two = Article(author=a), Article(author=a)
    session.add_all([one, two])
    one.likers.extend([b, c])  # dynamic side
    b.liked.append(two)  # the backref is a plain list
    session.commit()
    assert (one.likes_count, two.likes_count, b.likes_count, a.articles_count) == (2, 1, 2, 2)
    one.likers.remove(c)  # c is not loaded through the collection
    b.liked = [one]  # list replacement through the backref
    exact(session)
    assert (one.likes_count, two.likes_count, b.likes_count, c.likes_count) == (1, 0, 1, 0)


def test_self_referential_dynamic_follows(session: Session) -> None:
    a, b, c = people(session, 3)
    a.follows.extend([b, c])
    b.follows.append(a)
    c.followed_by.append(b)  # the backref side of the same table
    session.commit()
    assert (a.following_count, a.followers_count, b.following_count) == (2, 1, 2)
    assert (c.followers_count, b.followers_count) == (2, 1)
    a.follows.remove(b)
    b.follows.append(b)  # a self-follow: both counters of one parent, one row
    exact(session)
    assert (b.followers_count, b.following_count, a.following_count) == (1, 3, 1)
    session.delete(b)  # links on both sides go with it
    exact(session)
    assert (a.followers_count, a.following_count, c.followers_count) == (0, 1, 1)


def test_deleting_an_article_with_comments_and_likes(session: Session) -> None:
    a, b = people(session, 2)
    doomed, kept = Article(author=a), Article(author=b)
    session.add_all([doomed, kept])
    doomed.likers.extend([a, b])
    kept.likers.append(a)
    doomed.comments.extend([Comment(author_id=a.id), Comment(author_id=b.id)])
    kept.comments.append(Comment(author_id=a.id))
    session.commit()
    assert (doomed.comments_count, a.likes_count, b.likes_count) == (2, 2, 1)
    for comment in doomed.comments:
        session.delete(comment)
    session.delete(doomed)
    exact(session)
    assert (a.articles_count, a.likes_count, b.likes_count, kept.comments_count) == (0, 1, 0, 1)


def test_merge_of_a_detached_article_moved_to_another_author(session: Session) -> None:
    a, b, c = people(session, 3)
    art = Article(author=a)
    session.add(art)
    session.commit()
    art_id, c_id = art.id, c.id
    assert (art.likes_count, art.comments_count, art.author_id) == (0, 0, a.id)
    session.expunge(art)  # the detached copy says 0 likes, 0 comments
    live = session.get(Article, art_id)
    assert live is not None
    live.likers.append(b)
    live.comments.append(Comment(author_id=b.id))
    session.commit()
    session.expunge(live)
    art.title = "edited"
    art.author_id = c_id  # an FK move carried by the stale copy
    merged = session.merge(art)
    exact(session)
    assert (merged.likes_count, merged.comments_count) == (1, 1)
    assert (cached(session, "profiles", "articles_count", a.id), c.articles_count) == (0, 1)


@pytest.mark.parametrize("sync", ["auto", "evaluate", "fetch", False])
def test_bulk_delete_of_comments_through_the_session(session: Session, sync: Any) -> None:
    (a,) = people(session, 1)
    one, two = Article(author=a), Article(author=a)
    session.add_all([one, two])
    one.comments.extend([Comment(author_id=a.id, body=str(i)) for i in range(3)])
    two.comments.extend([Comment(author_id=a.id, body=str(i)) for i in range(2)])
    session.commit()
    opts = {} if sync == "auto" else {"synchronize_session": sync}
    session.execute(sa.delete(Comment).where(Comment.article_id == one.id), execution_options=opts)
    # Flask-SQLAlchemy's Model.query.filter_by(...).delete(): the legacy Query form.
    session.query(Comment).filter_by(article_id=two.id, body="0").delete()
    exact(session)
    assert (one.comments_count, two.comments_count) == (0, 1)


def test_statements_on_keyless_tables_with_null_keys(session: Session) -> None:
    a, b = people(session, 2)
    art = Article(author=a)
    session.add(art)
    session.commit()
    session.execute(sa.insert(follows).values(follower=a.id, followed=a.id))
    session.execute(
        sa.insert(likes),
        [{"profile_id": b.id, "article_id": art.id}, {"profile_id": None, "article_id": art.id}],
    )
    exact(session)
    assert (a.following_count, a.followers_count, art.likes_count, b.likes_count) == (1, 1, 2, 1)
    session.execute(sa.update(likes).where(likes.c.profile_id == b.id).values(profile_id=None))
    session.execute(sa.update(follows).values(followed=b.id))
    session.execute(sa.delete(likes).where(likes.c.profile_id.is_(None)))
    exact(session)
    assert (b.likes_count, art.likes_count, a.followers_count, b.followers_count) == (0, 0, 0, 1)


def test_unlinking_a_pair_linked_twice_in_a_keyless_table(session: Session) -> None:
    """Two racing "like" requests can store one pair twice; the unit of work deletes both."""
    a, b = people(session, 2)
    art = Article(author=a)
    session.add(art)
    session.commit()
    for _ in range(2):
        session.execute(sa.insert(likes).values(profile_id=b.id, article_id=art.id))
    session.commit()
    assert (art.likes_count, b.likes_count) == (2, 2)
    art.likers.remove(b)
    with pytest.raises(StaleDataError):  # SQLAlchemy: expected to delete 1 row, matched 2
        session.flush()
    session.rollback()
    exact(session)
    session.execute(
        sa.delete(likes).where(likes.c.profile_id == b.id, likes.c.article_id == art.id)
    )
    exact(session)
    assert (art.likes_count, b.likes_count) == (0, 0)


def test_a_follow_table_keyed_on_a_unique_non_key_column_is_refused() -> None:
    """Conduit's follow table referenced ``userprofile.user_id``; joined on ``id``."""

    class Other(DeclarativeBase):
        pass

    bad = sa.Table(
        "follows",
        Other.metadata,
        sa.Column("follower", sa.Integer, sa.ForeignKey("profiles.user_id")),
        sa.Column("followed", sa.Integer, sa.ForeignKey("profiles.user_id")),
    )

    class Profile(Other):
        __tablename__ = "profiles"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(unique=True)
        following_count: Mapped[int] = counter_cache("follows.follower")
        follows = relationship(
            "Profile",
            secondary=bad,
            primaryjoin=lambda: Profile.id == bad.c.follower,
            secondaryjoin=lambda: Profile.id == bad.c.followed,
        )

    try:
        with pytest.raises(CounterDeclarationError) as err:
            Other.registry.configure()
    finally:
        Other.registry.dispose()  # a failed registry must not poison other tests
    msg = str(err.value)
    assert msg.startswith("Profile.following_count: follows.follower has no ForeignKey")
    assert "it references profiles.user_id, not the primary key" in msg
    assert 'sa.ForeignKey("profiles.id")' in msg


# --- Concurrent writers of these shapes (PostgreSQL and MariaDB) ------------------------------


def _server(url: str) -> sa.Engine:
    from races import race_engine

    engine = race_engine(url)
    Base.metadata.create_all(engine)
    return engine


def _is_deadlock(exc: BaseException) -> bool:
    from conftest import is_deadlock

    return is_deadlock(exc)


def test_writers_unlinking_disjoint_pairs_of_an_unindexed_keyless_table(server_url: str) -> None:
    """Conduit's favourite table: two foreign keys, no key, no declared index; no deadlock.

    InnoDB creates the foreign keys' indexes itself: before the library found
    them on the server (``innodb_access.keyless_access``), the unit of work's locking
    read (an index merge over both) and its DELETE locked along different
    paths, and on MariaDB writers unlinking disjoint pairs deadlocked (88-99
    times in 1,200 like/unlike transactions of 8 threads).
    """
    import random
    import threading

    from races import Racer

    engine = _server(server_url)
    try:
        with Session(engine) as s:
            profiles = [Profile(user_id=i) for i in range(5)]
            arts = [Article(author=profiles[i]) for i in range(4)]
            s.add_all(profiles + arts)
            s.commit()
            pids, aids = [p.id for p in profiles], [a.id for a in arts]
        deadlocks: list[BaseException] = []
        stop = threading.Event()

        def writer(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(80):
                if stop.is_set():
                    return
                with Session(engine) as s:
                    try:
                        p, a = s.get(Profile, rnd.choice(pids)), s.get(Article, rnd.choice(aids))
                        if rnd.random() < 0.5:
                            a.likers.append(p)
                        elif a.likers.filter(Profile.id == p.id).count():
                            a.likers.remove(p)
                        s.commit()
                    except StaleDataError:  # a pair liked twice: SQLAlchemy's refusal
                        s.rollback()
                    except sa.exc.OperationalError as exc:
                        s.rollback()
                        if not _is_deadlock(exc):
                            raise
                        deadlocks.append(exc)
                        stop.set()

        racers = [Racer(lambda n=n: writer(n), name=f"liker-{n}").start() for n in range(6)]
        for racer in racers:
            racer.join()
        with engine.connect() as conn:
            assert drift(conn) == []
        assert deadlocks == []
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


@pytest.mark.parametrize("held_by", ["dirty_article", "new_article"])
def test_an_uncounted_fk_to_a_counted_parent_table_meets_a_follow(
    server_url: str, held_by: str
) -> None:
    """A comment by profile 1 on an article of profile 4, while profile 1 follows profile 4.

    The commenter's flush locks profile 4 exclusively (a counted parent);
    the comment's *uncounted* ``author_id`` check then takes a shared lock on
    profile 1, out of key order, while the follower holds profile 1 and waits
    for profile 4. On InnoDB the flush now locks profile 1 with its other
    parents, in key order (``plan.uncounted_parent_fks``); before, MariaDB
    deadlocked here every time.

    ``dirty_article``: Conduit's ``Comment(article, author, body)``: the backref
    puts the article into the flush, which locks its author (profile 4).
    ``new_article``: the same flush also creates an article of profile 4 (a
    counted parent locked for its own delta).
    """
    import threading

    from races import Racer, lock_waiters, wait_until

    engine = _server(server_url)
    try:
        with Session(engine) as s:
            profiles = [Profile(user_id=i) for i in range(4)]
            s.add_all(profiles)
            s.flush()
            art = Article(author=profiles[3])
            s.add(art)
            s.commit()
            p1, p4, art_id = profiles[0].id, profiles[3].id, art.id
        commenting = threading.Event()
        follower_done = threading.Event()

        def before_comment_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if threading.current_thread().name == "commenter" and statement.startswith(
                "INSERT INTO comments"
            ):
                commenting.set()  # profile 4 is locked by now: let the follower run into it
                wait_until(
                    lambda: follower_done.is_set() or lock_waiters(engine) >= 1,
                    "the follower to wait for profile 4",
                )

        sa.event.listen(engine, "before_cursor_execute", before_comment_insert)

        def comment() -> None:
            with Session(engine) as s:
                if held_by == "dirty_article":
                    s.add(Comment(article=s.get(Article, art_id), author_id=p1))
                else:
                    s.add(Article(author_id=p4))
                    s.add(Comment(article_id=art_id, author_id=p1))
                s.commit()

        def follow() -> None:
            commenting.wait(30)
            try:
                with Session(engine) as s:
                    me, them = s.get(Profile, p1), s.get(Profile, p4)
                    assert me is not None and them is not None
                    me.follows.append(them)
                    s.commit()
            finally:
                follower_done.set()

        commenter = Racer(comment, name="commenter").start()
        follower = Racer(follow, name="follower").start()
        errors = []
        for racer in (commenter, follower):
            try:
                racer.join()
            except sa.exc.OperationalError as exc:
                errors.append(exc)
        assert errors == []
        with engine.connect() as conn:
            assert drift(conn) == []
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_a_mapped_child_keyed_on_a_unique_non_key_column_is_refused() -> None:
    class Other(DeclarativeBase):
        pass

    class Profile(Other):
        __tablename__ = "profiles"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(unique=True)
        posts_count: Mapped[int] = counter_cache("Post.author_user_id")

    class Post(Other):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        author_user_id: Mapped[int] = mapped_column(sa.ForeignKey("profiles.user_id"))

    try:
        with pytest.raises(CounterDeclarationError) as err:
            Other.registry.configure()
    finally:
        Other.registry.dispose()
    msg = str(err.value)
    assert msg.startswith("Profile.posts_count: Post.author_user_id has no ForeignKey")
    assert "it references profiles.user_id, not the primary key" in msg
    assert 'mapped_column(ForeignKey("profiles.id"))' in msg
