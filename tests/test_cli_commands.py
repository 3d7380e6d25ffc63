"""``alembic counterfill`` and ``alembic-counterfill``: help, list, status, global options.

Every command runs as a subprocess of the real executables, in one migrated
SQLite project per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from projects import ALEMBIC, ALEMBIC_COUNTERFILL, Project, clean_env, init_template, make_project

from alembic_counterfill import progress

KEYS = ["forums.topics_count", "users.followers_count", "users.likes_total", "users.posts_count"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    template = init_template(tmp_path_factory.mktemp("alembic-init"))
    root = tmp_path_factory.mktemp("cli")
    project = make_project(template, root / "project", f"sqlite:///{root / 'app.db'}")
    project.autogenerate("create tables")
    project.ok("upgrade", "head")
    project.write_models(with_user_counters=True)
    project.autogenerate("add counters")
    project.ok("upgrade", "head")
    return project


@pytest.fixture
def engine(project: Project) -> Iterator[sa.Engine]:
    """The project's database; counters are put back to pending after each test."""
    engine = sa.create_engine(project.db_url)
    with engine.begin() as conn:
        snapshot = conn.execute(sa.select(progress.counters_table)).mappings().all()
    yield engine
    with engine.begin() as conn:
        conn.execute(sa.delete(progress.batches_table))
        conn.execute(sa.delete(progress.runs_table))
        conn.execute(sa.delete(progress.counters_table))
        conn.execute(sa.insert(progress.counters_table), [dict(r) for r in snapshot])
    engine.dispose()


def _json(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _states(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return {item["counter"]: item["state"] for item in _json(result)}  # type: ignore[misc]


def test_alembic_counterfill_help_is_the_click_groups(project: Project) -> None:
    result = project.alembic("counterfill", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: alembic counterfill [OPTIONS] COMMAND [ARGS]...")
    assert "  list " in result.stdout and "  status " in result.stdout


def test_subcommand_help_is_not_swallowed_by_alembic(project: Project) -> None:
    result = project.alembic("counterfill", "status", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: alembic counterfill status [OPTIONS] [COUNTERS]...")
    assert "--watch" in result.stdout and "--interval" in result.stdout


def test_help_needs_no_config_file(tmp_path: Path) -> None:
    for exe in ([ALEMBIC, "counterfill"], [ALEMBIC_COUNTERFILL]):
        result = subprocess.run(
            [*exe, "status", "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=clean_env(),
        )
        assert result.returncode == 0, result.stderr
        assert "--json" in result.stdout


def test_console_script_offers_alembics_global_options(project: Project) -> None:
    result = project.counterfill("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: alembic-counterfill [OPTIONS] COMMAND [ARGS]...")
    for option in ("-c, --config FILE", "-n, --name TEXT", "-x TEXT", "--raiseerr"):
        assert option in result.stdout


def test_list_shows_every_declared_counter_and_what_it_counts(project: Project, engine) -> None:
    result = project.alembic("counterfill", "list")
    assert result.returncode == 0, result.stderr
    table, _, hints = result.stdout.partition("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["COUNTER", "STATE", "COUNTS"]
    assert [line.split()[0] for line in lines[1:]] == KEYS
    # Created with its table, never requested nor verified: unknown, with the fix.
    assert "forums.topics_count    unknown  COUNT(topics) BY topics.forum_id" in lines[1]
    assert "forums.topics_count: no backfill was requested or verified" in hints


def test_list_json_through_the_console_script(project: Project, engine) -> None:
    data = _json(project.counterfill("list", "--json"))
    by_key = {d["counter"]: d for d in data}
    assert list(by_key) == KEYS
    assert by_key["users.likes_total"]["sum"] == "likes"
    assert by_key["users.posts_count"]["where"] is True
    assert by_key["users.followers_count"]["state"] == "pending"


def test_status_json_has_the_documented_fields(project: Project, engine) -> None:
    data = _json(project.alembic("counterfill", "status", "--json"))
    assert [d["counter"] for d in data] == KEYS
    for item in data:
        assert {"counter", "state", "batches_done", "batches_total"} <= set(item)
    assert _states(project.alembic("counterfill", "status", "--json")) == {
        "forums.topics_count": "unknown",
        "users.followers_count": "pending",
        "users.likes_total": "pending",
        "users.posts_count": "pending",
    }


def test_status_can_be_narrowed_to_named_counters(project: Project, engine) -> None:
    data = _json(project.counterfill("status", "--json", "users.likes_total"))
    assert [d["counter"] for d in data] == ["users.likes_total"]


def _backfilling(engine: sa.Engine) -> None:
    """Record a run the way the backfill engine does: 3 of 10 batches done, one failed."""
    now = progress.now()
    with engine.begin() as conn:
        run_id = conn.execute(
            sa.insert(progress.runs_table)
            .values(
                table_name="users",
                counter_keys="users.followers_count",
                batch_size=100,
                state="running",
                batches_total=10,
                batches_done=3,
                batches_failed=1,
                rows_changed=1234,
                created_at=now,
            )
            .returning(progress.runs_table.c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(progress.batches_table).values(
                run_id=run_id, seq=4, state="failed", error="boom: deadlock", finished_at=now
            )
        )
        conn.execute(
            sa.update(progress.counters_table)
            .where(progress.counters_table.c.key == "users.followers_count")
            .values(state=progress.BACKFILLING, run_id=run_id)
        )


def test_status_shows_batch_and_row_figures(project: Project, engine: sa.Engine) -> None:
    _backfilling(engine)
    human = project.alembic("counterfill", "status")
    assert human.returncode == 0, human.stderr
    row = next(line for line in human.stdout.splitlines() if line.startswith("users.followers"))
    assert row.split()[:5] == ["users.followers_count", "backfilling", "3/10", "1", "1,234"]
    assert "users.followers_count: boom: deadlock" in human.stdout
    (item,) = _json(project.counterfill("status", "--json", "users.followers_count"))
    assert (item["state"], item["batches_done"], item["batches_total"]) == ("backfilling", 3, 10)
    assert (item["rows_changed"], item["last_error"]) == (1234, "boom: deadlock")


def test_watch_refreshes_until_every_counter_is_active_or_failed(
    project: Project, engine: sa.Engine
) -> None:
    args = [ALEMBIC, "counterfill", "status", "--json", "--watch", "--interval", "0.1"]
    with subprocess.Popen(
        args, cwd=project.root, env=clean_env(), stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert {d["state"] for d in first} == {"unknown", "pending"}
        time.sleep(0.3)
        assert proc.poll() is None  # still watching: some counters are pending
        with engine.begin() as conn:
            conn.execute(sa.update(progress.counters_table).values(state=progress.ACTIVE))
            conn.execute(
                sa.update(progress.counters_table)
                .where(progress.counters_table.c.key == "users.likes_total")
                .values(state=progress.FAILED)
            )
        rest = proc.stdout.read()
        assert proc.wait(timeout=30) == 0
    last = json.loads(rest.strip().splitlines()[-1])
    assert {d["counter"]: d["state"] for d in last}["users.likes_total"] == "failed"
    assert {d["state"] for d in last} == {"active", "failed", "unknown"}


def test_watch_stops_at_once_when_nothing_is_pending(project: Project, engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(progress.counters_table).values(state=progress.ACTIVE))
    result = project.counterfill("status", "--watch", "--interval", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("COUNTER") == 1


@pytest.fixture
def other_db(project: Project) -> Iterator[str]:
    """A second database, a copy of the project's with every counter failed."""
    target = project.root.parent / "other.db"
    shutil.copy(project.db_url.removeprefix("sqlite:///"), target)
    url = f"sqlite:///{target}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.update(progress.counters_table).values(state=progress.FAILED))
    engine.dispose()
    yield url
    target.unlink()


def test_alembic_global_config_option_applies(project: Project, engine, other_db: str) -> None:
    ini = (project.root / "alembic.ini").read_text()
    (project.root / "other.ini").write_text(ini.replace(project.db_url, other_db))
    expected = {k: "failed" for k in KEYS[1:]}
    for result in (
        project.alembic("-c", "other.ini", "counterfill", "status", "--json"),
        project.counterfill("-c", "other.ini", "status", "--json"),
    ):
        states = _states(result)
        assert {k: v for k, v in states.items() if k != KEYS[0]} == expected


def test_alembic_name_option_picks_the_ini_section(project: Project, engine, other_db) -> None:
    ini = project.root / "alembic.ini"
    original = ini.read_text()
    ini.write_text(original + f"\n[staging]\nsqlalchemy.url = {other_db}\n")
    try:
        for result in (
            project.alembic("-n", "staging", "counterfill", "status", "--json"),
            project.counterfill("-n", "staging", "status", "--json"),
        ):
            assert _states(result)["users.followers_count"] == "failed"
    finally:
        ini.write_text(original)


def test_pyproject_toml_configuration(project: Project, engine, tmp_path: Path) -> None:
    shutil.copy(project.root / "models.py", tmp_path / "models.py")
    (tmp_path / "pyproject.toml").write_text(
        "[tool.alembic]\nscript_location = 'migrations'\n\n"
        "[tool.alembic.counterfill]\n"
        "metadata = 'models:Base'\n"
        f"database_url = '{project.db_url}'\n"
        "batch_size = 500\n"
    )
    result = subprocess.run(
        [ALEMBIC_COUNTERFILL, "status", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert _states(result)["users.posts_count"] == "pending"


def test_importing_the_cli_leaves_fold_and_other_databases_dialects_unimported() -> None:
    """The CLI's start-up imports neither fold (SQL builders) nor the MySQL/PostgreSQL dialects.

    Every command pays the import of the CLI, and ``enqueue`` (without
    ``--inline``) or ``status`` use none of these; an engine imports its own
    dialect when it is created. ``fold --help`` still shows the chunk's default.
    """
    import sys

    probe = (
        "import sys, alembic_counterfill.cli; "
        "print(','.join(m for m in ('alembic_counterfill.fold', 'alembic_counterfill.sql', "
        "'sqlalchemy.dialects.mysql', 'sqlalchemy.dialects.postgresql') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=clean_env()
    )
    assert out.stdout.strip() == ""
    help_text = subprocess.run(
        [ALEMBIC_COUNTERFILL, "fold", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout
    assert "default: 1000" in help_text
