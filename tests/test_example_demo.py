"""``python -m example_project demo`` end to end at a small size, judged by our own COUNT(*).

Embedded default (SQLite file, batches in-process) and the real stack
(PostgreSQL or MariaDB, Redis, two ``dramatiq alembic_counterfill.worker``
processes the demo starts and stops itself).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

USERS = 300


def counter_mismatches(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Users whose cached counters differ from a plain COUNT(*) over follows and posts."""
    users = sa.table(
        "users",
        sa.column("id"),
        sa.column("followers_count"),
        sa.column("following_count"),
        sa.column("posts_count"),
    )
    follows = sa.table("follows", sa.column("follower_id"), sa.column("followed_id"))
    posts = sa.table("posts", sa.column("author_id"), sa.column("published"))
    followers = sa.select(sa.func.count()).where(follows.c.followed_id == users.c.id)
    following = sa.select(sa.func.count()).where(follows.c.follower_id == users.c.id)
    published = sa.select(sa.func.count()).where(
        posts.c.author_id == users.c.id, posts.c.published == sa.true()
    )
    query = sa.select(
        users.c.id,
        users.c.followers_count,
        followers.scalar_subquery(),
        users.c.following_count,
        following.scalar_subquery(),
        users.c.posts_count,
        published.scalar_subquery(),
    ).order_by(users.c.id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    assert rows, "no users at all"
    return [r for r in rows if (r[1], r[3], r[5]) != (r[2], r[4], r[6])]


def run_demo(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the demo in ``cwd``; on timeout, SIGTERM it so it stops its workers, then fail."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_project", "demo", "--users", str(USERS), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"demo timed out\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def status_table(out: str, after_heading: str) -> dict[str, str]:
    """The ``counterfill status`` table printed after the heading ``after_heading``."""
    section = out.split(after_heading, 1)[1]
    return dict(re.findall(r"^(users\.\w+)\s+(\w+)", section, re.M)[:3])


def assert_demo_worked(proc: subprocess.CompletedProcess[str], url: str) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "$ " in out and "counterfill enqueue --wait --verify" in out
    counters = ["users.followers_count", "users.following_count", "users.posts_count"]
    assert status_table(out, "Status before the backfill") == dict.fromkeys(counters, "pending")
    assert status_table(out, "Status after the backfill") == dict.fromkeys(counters, "active")
    assert re.search(r"speed-up\s*:\s*[\d.]+x", out)
    assert "verify found no drift" in out
    engine = sa.create_engine(url)
    try:
        assert counter_mismatches(engine) == []
        with engine.connect() as conn:
            users, followers = conn.execute(
                sa.text("select count(*), sum(followers_count) from users")
            ).one()
        assert users == USERS and followers > USERS  # real data, really backfilled
    finally:
        engine.dispose()


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    proc = run_demo(tmp_path)
    assert_demo_worked(proc, f"sqlite:///{tmp_path / 'demo' / 'demo.db'}")
    assert "alembic -c demo/alembic.ini upgrade 0001" in proc.stdout
    # The demo writes only into its work directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    again = run_demo(tmp_path)  # starts clean on every run
    assert again.returncode == 0, again.stdout + again.stderr


def test_demo_on_a_database_server_and_redis_with_real_workers(
    tmp_path: Path, server_url: str, redis_url: str
) -> None:
    """PostgreSQL, then MariaDB."""
    proc = run_demo(tmp_path, "--database-url", server_url, "--broker-url", redis_url)
    assert_demo_worked(proc, server_url)
    assert "dramatiq alembic_counterfill.worker" in proc.stdout
    pids = [int(p) for p in re.search(r"worker pids: ([\d ]+)", proc.stdout)[1].split()]
    assert len(pids) == 2
    assert "Stopped 2 workers" in proc.stdout
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} still running after the demo")

    # A second run on the same database migrates the first one away and starts clean.
    again = run_demo(tmp_path, "--database-url", server_url, "--broker-url", redis_url)
    assert_demo_worked(again, server_url)
    assert "downgrade base" in again.stdout


def test_demo_fails_in_one_line_when_a_step_fails(tmp_path: Path) -> None:
    # Nothing listens on port 1: the backfill cannot reach the broker.
    proc = run_demo(tmp_path, "--broker-url", "redis://127.0.0.1:1/0", timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    assert "Stopped 2 workers" in proc.stdout
    assert "verify found no drift" not in proc.stdout


def test_profile_fails_in_one_line_when_counters_are_stale(sqlite_url: str) -> None:
    from example_project.models import Base
    from example_project.seed import seed

    engine = sa.create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        seed(conn, 50, 1, progress=False)  # bypasses the ORM: counters stay 0
    engine.dispose()
    proc = subprocess.run(
        [sys.executable, "-m", "example_project", "profile", "--database-url", sqlite_url],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "differ from COUNT(*)" in proc.stderr and "verify --fix" in proc.stderr
