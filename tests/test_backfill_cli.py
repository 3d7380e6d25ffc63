"""``enqueue`` from the command line: options, environment defaults, in-process runs, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from backfill_project import USER_COUNTERS, Project, batch_rows, drift, run_rows, seed, states

from alembic_counterfill import progress


@pytest.fixture
def project(tmp_path: Path, db_url: str) -> Project:
    return Project(tmp_path / "project", db_url)


@pytest.fixture
def db(db_url: str):  # noqa: ANN201
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


def test_embedded_default_runs_batches_in_process(project: Project, db: sa.Engine) -> None:
    seed(db, users=120, orgs=8)
    result = project.cli("enqueue")
    assert result.exit_code == 0, result.output
    assert "running 4 batches in this process" in result.output
    assert "orgs, users: 4/4 batches done" in result.output  # summary
    assert drift(db) == []
    assert set(states(db).values()) == {progress.ACTIVE}


def test_inline_ignores_a_configured_broker(tmp_path: Path, db_url: str, db: sa.Engine) -> None:
    seed(db, users=60)
    project = Project(tmp_path / "p", db_url, broker_url="redis://127.0.0.1:1/0")
    result = project.cli("enqueue", "--inline", "--wait")
    assert result.exit_code == 0, result.output
    assert "backfill [####" in result.output  # the progress bar
    assert drift(db) == []


def test_environment_defaults_batch_size_wait_verify(project: Project, db: sa.Engine) -> None:
    seed(db, users=100)
    result = project.cli("enqueue", env={"BATCH_SIZE": "20", "WAIT": "1", "VERIFY": "true"})
    assert result.exit_code == 0, result.output
    assert len(batch_rows(db)) == 5
    assert "[####" in result.output and "no drift in users.followers_count" in result.output
    assert drift(db) == []


def test_batch_size_option_beats_environment(project: Project, db: sa.Engine) -> None:
    seed(db, users=100)
    result = project.cli("enqueue", "--batch-size", "25", env={"BATCH_SIZE": "10"})
    assert result.exit_code == 0, result.output
    assert len(batch_rows(db)) == 4


def test_nothing_to_do_then_all_and_named_recounts(project: Project, db: sa.Engine) -> None:
    seed(db, users=80)
    assert project.cli("enqueue").exit_code == 0
    again = project.cli("enqueue")
    assert again.exit_code == 0 and "nothing to backfill" in again.output
    with db.begin() as conn:  # drift behind the library's back (raw SQL)
        conn.execute(sa.text("UPDATE users SET likes_total = likes_total + 5 WHERE id < 10"))
    named = project.cli("enqueue", "users.likes_total")
    assert named.exit_code == 0, named.output
    assert "(users.likes_total)" in named.output  # a run of that counter only
    assert drift(db) == []
    everything = project.cli("enqueue", "--all")
    assert everything.exit_code == 0
    assert run_rows(db)[-1]["counter_keys"].split(",") == sorted(USER_COUNTERS)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["enqueue", "users.nope"], "users.nope"),
        (["enqueue", "--batch-size", "0"], "--batch-size"),
        (["enqueue", "--batch-size", "-5"], "--batch-size"),
        (["enqueue", "users.likes_total", "--all"], "not both"),
        (["verify", "users.nope"], "users.nope"),
    ],
)
def test_bad_input_is_a_usage_error_and_writes_nothing(
    project: Project, db: sa.Engine, args: list[str], needle: str
) -> None:
    seed(db, users=10)
    result = project.cli(*args)
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output
    assert run_rows(db) == []
    assert set(states(db).values()) == {progress.PENDING}


def test_bad_batch_size_in_environment_is_a_usage_error(project: Project, db: sa.Engine) -> None:
    seed(db, users=10)
    result = project.cli("enqueue", env={"BATCH_SIZE": "zero"})
    assert result.exit_code == 2 and "--batch-size" in result.output
    assert run_rows(db) == []


def test_status_figures_match_an_independent_count(project: Project, db: sa.Engine) -> None:
    """After a real run, `status --json` reports what the test counts itself, not what it wrote."""
    import json

    seed(db, users=230)
    wrong = {d[0] for d in drift(db)}  # users with at least one wrong counter (own COUNT/SUM)
    result = project.cli("enqueue", "--inline", "--batch-size", "50")
    assert result.exit_code == 0, result.output
    items = {s["counter"]: s for s in json.loads(project.cli("status", "--json").output)}
    for key in USER_COUNTERS:
        item = items[key]
        assert item["state"] == progress.ACTIVE
        assert item["batches_done"] == item["batches_total"] == 5  # ceil(230 / 50)
        assert item["rows_changed"] == len(wrong) > 0
    assert drift(db) == []
