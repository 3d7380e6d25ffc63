"""``enqueue`` from the command line: options, environment defaults, in-process runs, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from backfill_project import USER_COUNTERS, Project, batch_rows, drift, run_rows, seed, states
from backfill_project import counters_by_key as project_counters_by_key

from alembic_counterfill import planning, progress
from alembic_counterfill.runner import run_inline


def project_counters() -> list:
    """The test models' counters."""
    return list(project_counters_by_key().values())


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
    result = project.cli(
        "enqueue",
        env={"COUNTERFILL_BATCH_SIZE": "20", "COUNTERFILL_WAIT": "1", "COUNTERFILL_VERIFY": "true"},
    )
    assert result.exit_code == 0, result.output
    assert len(batch_rows(db)) == 5
    assert "[####" in result.output and "no drift in users.followers_count" in result.output
    assert drift(db) == []


def test_unprefixed_variables_of_other_tools_are_ignored(project: Project, db: sa.Engine) -> None:
    seed(db, users=100)
    result = project.cli("enqueue", env={"BATCH_SIZE": "10", "WAIT": "1", "VERIFY": "1"})
    assert result.exit_code == 0, result.output
    assert len(batch_rows(db)) == 2  # the configured 50, not BATCH_SIZE=10
    assert "[####" not in result.output and "no drift" not in result.output


def test_help_lists_the_environment_variables(project: Project) -> None:
    group = project.cli("--help").output
    for name in (
        "COUNTERFILL_BROKER_URL",
        "COUNTERFILL_BATCH_SIZE",
        "COUNTERFILL_WAIT",
        "COUNTERFILL_VERIFY",
        "ALEMBIC_CONFIG",
    ):
        assert name in group
    enqueue = project.cli("enqueue", "--help").output
    assert "COUNTERFILL_BATCH_SIZE" in enqueue and "COUNTERFILL_MAX_ROWS_PER_SECOND" in enqueue


def test_batch_size_option_beats_environment(project: Project, db: sa.Engine) -> None:
    seed(db, users=100)
    result = project.cli("enqueue", "--batch-size", "25", env={"COUNTERFILL_BATCH_SIZE": "10"})
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
    result = project.cli("enqueue", env={"COUNTERFILL_BATCH_SIZE": "zero"})
    assert result.exit_code == 2 and "--batch-size" in result.output
    assert run_rows(db) == []


def test_batch_size_on_a_resumed_run_is_applied_or_the_output_says_why_not(
    project: Project, db: sa.Engine
) -> None:
    seed(db, users=200)
    counters = {c.key: c for c in project_counters()}
    with db.begin() as conn:  # an adaptive run of 4 ranges of 50, one range done
        plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)
    run_inline(db, counters, plan.batch_ids[:1])
    smaller = project.cli("enqueue", "--batch-size", "20", "--inline")
    assert smaller.exit_code == 0, smaller.output
    assert "resuming run 1" in smaller.output and "20 parents per transaction" in smaller.output
    (run,) = run_rows(db)
    assert run["pinned"] and run["chunk_size"] == 20 and run["state"] == progress.DONE
    assert drift(db) == []
    with db.begin() as conn:  # a fresh recount, then resumed with a bigger size
        conn.execute(sa.update(progress.counters_table).values(state=progress.ACTIVE))
        plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)
    run_inline(db, counters, plan.batch_ids[:1])
    bigger = project.cli("enqueue", *USER_COUNTERS, "--batch-size", "500", "--inline")
    assert bigger.exit_code == 0, bigger.output
    assert "--batch-size 500: this run's ranges were planned at 50 parents" in bigger.output


def test_ctrl_c_during_wait_says_the_workers_carry_on(
    project: Project, db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic_counterfill import actors, cli_backfill, monitor

    seed(db, users=20)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(actors, "send_batches", lambda broker, queue, ids: len(ids))
    monkeypatch.setattr(actors, "ping", lambda broker, url: None)
    monkeypatch.setattr(actors, "queued_batch_ids", lambda broker, queue: set())
    monkeypatch.setattr(monitor, "wait", interrupted)
    env = {"COUNTERFILL_BROKER_URL": "redis://127.0.0.1:1/0"}  # never contacted
    result = project.cli("enqueue", "--wait", env=env)
    assert result.exit_code == 0, result.output
    assert "stopped watching; the workers carry on" in result.output
    assert f"alembic-counterfill -c {project.ini} status --watch" in result.output
    assert cli_backfill.SEND_CHUNK > 0


def test_key_ranges_print_open_ends_as_infinities() -> None:
    assert planning.range_text(None, "51") == "[-inf, 51)"
    assert planning.range_text('"a"', None) == "[a, +inf)"


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
