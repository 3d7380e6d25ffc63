"""pause/resume, queued-message tracking and --wait on failures, with real worker subprocesses."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pytest
import redis
import sqlalchemy as sa
from backfill_project import (
    BIN,
    USER_COUNTERS,
    Project,
    batch_rows,
    counters_by_key,
    drift,
    run_rows,
    seed,
    states,
    wait_for,
)

from alembic_counterfill import monitor, planning, progress
from alembic_counterfill.batch import note_retry

DONE_LINE = re.compile(r"batch (\d+) users\.\S+ \[.*; batch done")


@pytest.fixture
def pg(server_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(server_url, pool_size=6)
    yield engine
    engine.dispose()


@pytest.fixture
def project(tmp_path: Path, server_url: str, redis_url: str) -> Project:
    return Project(tmp_path / "project", server_url, broker_url=redis_url)


def _queue_key(redis_url: str, queue: str) -> tuple[redis.Redis, str]:
    """A client on the test's Redis and the list key of ``queue`` in its namespace."""
    parts = urlsplit(redis_url)
    namespace = dict(parse_qsl(parts.query)).get("namespace", "dramatiq")
    client = redis.Redis.from_url(urlunsplit(parts._replace(query="")))
    return client, f"{namespace}:{queue}"


def _status(project: Project) -> list[dict]:
    """``status --json`` of the users counters (the ones these tests backfill)."""
    result = project.cli("status", "--json", *USER_COUNTERS)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_paused_batches_are_left_for_later_and_resume_completes_them_once(
    project: Project, pg: sa.Engine
) -> None:
    seed(pg, users=1000)
    assert project.cli("enqueue").exit_code == 0  # 20 batches queued, no worker yet
    paused = project.cli("pause")
    assert paused.exit_code == 0, paused.output
    assert "paused: " in paused.output and "resume" in paused.output
    assert set(states(pg).values()) == {progress.PAUSED}
    with project.worker() as worker:
        wait_for(lambda: worker.log.count("paused; left for later") >= 5, what="paused batches")
        assert DONE_LINE.findall(worker.log) == []
        (run,) = run_rows(pg)
        assert run["batches_done"] == 0  # nothing applied while paused
        status = _status(project)
        assert {s["state"] for s in status} == {progress.PAUSED}
        assert {s["activity"] for s in status} == {"paused"}
        assert "paused" in project.cli("status").output
        waited = project.cli("enqueue", "--wait")  # says so instead of hanging
        assert waited.exit_code == 1 and "paused" in waited.output and "resume" in waited.output
        resumed = project.cli("resume")
        assert resumed.exit_code == 0 and "resumed: " in resumed.output
        wait_for(
            lambda: run_rows(pg)[0]["state"] == progress.DONE,
            what="the run to complete",
            timeout=90,
        )
        # A batch's line is logged just after its commit: the run can be done
        # before the last line is written, so wait for as many lines as batches.
        total = len(batch_rows(pg))
        log = wait_for(
            lambda: worker.log if len(DONE_LINE.findall(worker.log)) >= total else None,
            what="every batch's log line",
        )
    assert "setup plugin" not in log  # alembic's plugin set-up lines stay out of worker logs
    done = DONE_LINE.findall(log)
    assert sorted(int(i) for i in done) == sorted(b["id"] for b in batch_rows(pg))  # once each
    assert drift(pg) == []
    assert set(states(pg).values()) == {progress.ACTIVE}


def test_enqueue_again_sends_only_batches_not_still_queued(
    project: Project, pg: sa.Engine, redis_url: str
) -> None:
    seed(pg, users=500)
    first = project.cli("enqueue")
    assert first.exit_code == 0 and "sent 10 batches" in first.output
    again = project.cli("enqueue")
    assert again.exit_code == 0, again.output
    assert "sent 0 batches" in again.output and "10 still queued" in again.output
    client, queue_key = _queue_key(redis_url, project.queue)
    assert client.llen(queue_key) == 10  # not 20
    client.delete(queue_key)  # the messages are lost
    third = project.cli("enqueue")
    assert "sent 10 batches" in third.output
    with project.worker():
        result = project.cli("enqueue", "--wait")
        assert result.exit_code == 0, result.output
    assert drift(pg) == []


def test_hints_keep_the_users_config_option(project: Project, pg: sa.Engine) -> None:
    seed(pg, users=100)
    result = project.cli("enqueue")
    assert result.exit_code == 0, result.output
    assert f"follow with: alembic-counterfill -c {project.ini} status --watch" in result.output
    # The stock alembic executable, with alembic's own -c: the hint repeats it.
    proc = subprocess.run(
        [str(BIN / "alembic"), "-c", project.ini, "counterfill", "enqueue", "--all"],
        cwd=project.path.parent,
        env=project.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"follow with: alembic -c {project.ini} counterfill status --watch" in proc.stdout


def _read_only_user(pg: sa.Engine, uid: int) -> None:
    """Every write to user ``uid`` fails from now on (a trigger; test-only SQL)."""
    if pg.dialect.name == "postgresql":
        trigger = (
            "CREATE FUNCTION read_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'user is read-only'; END $$;"
            "CREATE TRIGGER read_only BEFORE UPDATE ON users FOR EACH ROW "
            f"WHEN (NEW.id = {uid}) EXECUTE FUNCTION read_only()"
        )
    else:  # MariaDB
        trigger = (
            "CREATE TRIGGER read_only BEFORE UPDATE ON users FOR EACH ROW "
            f"BEGIN IF NEW.id = {uid} THEN "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'user is read-only'; END IF; END"
        )
    with pg.begin() as conn:
        conn.execute(sa.text(trigger))


def test_wait_shows_failures_and_ends_non_zero_when_the_run_failed(
    project: Project, pg: sa.Engine
) -> None:
    seed(pg, users=200)
    _read_only_user(pg, 77)
    env = {"COUNTERFILL_MAX_RETRIES": "1", "COUNTERFILL_MIN_BACKOFF": "10"}
    with project.worker(**env):
        result = project.cli("enqueue", "--wait")
    assert result.exit_code == 1
    bar = [line for line in result.output.splitlines() if line.startswith("backfill [")][-1]
    error = ("RaiseException" if pg.dialect.name == "postgresql" else "OperationalError") + (
        ": user is read-only"
    )
    assert "1 failed" in bar and f"last error: {error}" in bar
    assert f"[51, 101) failed: {error}" in result.output
    assert "1 batches failed" in result.output and f"-c {project.ini} enqueue" in result.output
    assert {s["state"] for s in _status(project)} == {progress.FAILED}


def test_retries_show_in_the_bar_and_status_as_they_happen(pg: sa.Engine) -> None:
    seed(pg, users=100)
    counters = counters_by_key()
    with pg.begin() as conn:
        plan = planning.plan(conn, [counters[k] for k in USER_COUNTERS], 50)
    note_retry(pg, plan.batch_ids[0], "OperationalError: server closed the connection")
    with pg.connect() as conn:
        pr = monitor.read_progress(conn, plan.run_ids)
        status = progress.statuses(conn, [USER_COUNTERS[0]])[0]
    assert pr.retrying == 1
    text = monitor.Bar(io.StringIO(), "backfill", tty=False).render(pr)
    assert "1 retrying" in text and "last error: OperationalError: server closed" in text
    assert status.retrying == 1 and "server closed" in (status.last_error or "")


def test_ctrl_c_while_sending_records_what_was_sent_and_says_how_to_resume(
    project: Project, pg: sa.Engine, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic_counterfill import actors, cli_backfill

    seed(pg, users=1000)  # 20 batches
    monkeypatch.setattr(cli_backfill, "SEND_CHUNK", 5)
    real_send, calls = actors.send_batches, []

    def interrupted_send(broker: object, queue: str, batch_ids: list[int]) -> int:
        calls.append(batch_ids)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C before the third chunk went out
        return real_send(broker, queue, batch_ids)

    monkeypatch.setattr(actors, "send_batches", interrupted_send)
    result = project.cli("enqueue")
    assert result.exit_code == 130
    assert "interrupted: sent 10 of 20 batches" in result.output
    assert f"alembic-counterfill -c {project.ini} enqueue" in result.output
    client, queue_key = _queue_key(redis_url, project.queue)
    assert client.llen(queue_key) == 10
    monkeypatch.setattr(actors, "send_batches", real_send)
    again = project.cli("enqueue")
    assert "sent 10 batches" in again.output and "10 still queued" in again.output
    assert client.llen(queue_key) == 20  # each batch once


def test_a_worker_started_outside_a_project_says_to_set_alembic_config_in_one_line(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ALEMBIC_CONFIG",)}
    proc = subprocess.run(
        [str(BIN / "dramatiq"), "alembic_counterfill.worker", "--processes", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "alembic_counterfill.worker" in line]
    assert len(ours) == 1 and "ALEMBIC_CONFIG=" in ours[0] and "no alembic.ini" in ours[0]
    assert "Traceback" not in proc.stderr
