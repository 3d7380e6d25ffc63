"""``verify``: each drift reported as table, id, column, cached, actual; --fix; live traffic."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from backfill_project import Project, Writers, counters_by_key, drift, seed, wait_for

from alembic_counterfill.verify import verify

CORRUPT = [(3, "likes_total", 999), (4, "followers_count", 77), (40, "posts_count", 55)]


@pytest.fixture
def db(db_url: str):  # noqa: ANN201
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


def _corrupt(engine: sa.Engine, changes: list[tuple[int, str, int]]) -> None:
    with engine.begin() as conn:  # raw SQL: invisible to live maintenance, as the docs warn
        for uid, column, value in changes:
            conn.execute(
                sa.text(f"UPDATE users SET {column} = :v WHERE id = :id"), {"v": value, "id": uid}
            )


def test_verify_reports_each_drift_then_fix_repairs_it(
    tmp_path: Path, db_url: str, db: sa.Engine
) -> None:
    seed(db, users=120)
    project = Project(tmp_path / "p", db_url)
    assert project.cli("enqueue").exit_code == 0
    _corrupt(db, CORRUPT)
    truth = {(uid, col): actual for uid, col, _, actual in drift(db)}
    assert set(truth) == {(uid, col) for uid, col, _ in CORRUPT}

    result = project.cli("verify")
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["TABLE", "ID", "COLUMN", "CACHED", "ACTUAL"]  # status's style
    expected = {
        ("users", str(uid), col, str(value), str(truth[uid, col])) for uid, col, value in CORRUPT
    }
    assert {tuple(line.split()) for line in lines[1:]} == expected
    assert "3 drifted values" in result.stderr

    as_json = project.cli("verify", "--json")
    assert as_json.exit_code == 1
    reported = json.loads(as_json.stdout)
    assert {(d["table"], d["id"], d["column"], d["cached"], d["actual"]) for d in reported} == {
        ("users", uid, col, value, truth[uid, col]) for uid, col, value in CORRUPT
    }

    fixed = project.cli("verify", "--fix")
    assert fixed.exit_code == 0 and "fixed 3 drifted values" in fixed.stderr
    assert drift(db) == []
    assert project.cli("verify").exit_code == 0


def test_verify_skips_pending_counters_unless_named(
    tmp_path: Path, db_url: str, db: sa.Engine
) -> None:
    seed(db, users=50)  # every users counter pending and wrong
    project = Project(tmp_path / "p", db_url)
    result = project.cli("verify")
    assert result.exit_code == 0
    assert "skipped (not active yet): users.followers_count" in result.stderr
    named = project.cli("verify", "users.followers_count")
    assert named.exit_code == 1


def _norm(ident: object) -> str:
    # SQLite hands raw UUIDs back as 32 hex digits, the ORM as uuid.UUID.
    return str(ident) if isinstance(ident, int) else uuid.UUID(str(ident)).hex


def test_verify_scans_in_ranges_and_checks_every_counter_of_a_table(db: sa.Engine) -> None:
    seed(db, users=230, orgs=12)
    counters = list(counters_by_key().values())
    expected = {(_norm(i), col) for i, col, _, _ in drift(db)}
    found = verify(db, counters, batch_size=17)
    assert {(_norm(d.id), d.column) for d in found} == expected
    repaired = verify(db, counters, fix=True, batch_size=17)
    assert all(d.fixed for d in repaired) and len(repaired) == len(found)
    assert drift(db) == []


def test_verify_fix_racing_live_writes_reports_only_real_drift(
    tmp_path: Path, server_url: str
) -> None:
    engine = sa.create_engine(server_url, pool_size=10)
    try:
        users = 3000
        seed(engine, users=users)
        project = Project(tmp_path / "p", server_url, batch_size=200)
        assert project.cli("enqueue").exit_code == 0
        injected = [(uid, "followers_count", 10_000 + uid) for uid in range(5, users, 150)]
        _corrupt(engine, injected)
        with Writers(engine, users) as writers:
            wait_for(lambda: writers.writes >= 30 or writers.errors, what="writers to get going")
            before = writers.writes
            result = project.cli("verify", "--fix", "--json")
            during = writers.writes - before
        assert writers.errors == []
        assert during > 0
        assert result.exit_code == 0, result.output
        reported = {(d["id"], d["column"]) for d in json.loads(result.stdout)}
        assert reported == {(uid, col) for uid, col, _ in injected}  # nothing false, nothing missed
        assert drift(engine) == []
    finally:
        engine.dispose()
