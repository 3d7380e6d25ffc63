"""No password in any output: stdout, stderr, worker logs, error messages or reprs.

The database URL carries ``s3cret``: on PostgreSQL, which trusts local
connections and ignores it, and on MariaDB as the password of a user created
for this test (and dropped after); the Redis URL carries it as an ACL user's
password created for this test (and removed after), so a real worker runs a
real backfill, with a failing batch, through URLs that hold the secret. Bad
URLs with the secret must end in one line naming the problem, never a
traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import sqlalchemy as sa
from backfill_project import BIN, Project, drift, make_read_only, seed
from conftest import REDIS_BASE, RUN_ID

from alembic_counterfill import progress
from alembic_counterfill.config import Settings

SECRET = "s3cret"


@pytest.fixture
def db(server_url: str) -> Iterator[sa.Engine]:
    """PostgreSQL, then MariaDB (conftest's ``server_url``): this test's own schema or database."""
    engine = sa.create_engine(server_url)
    yield engine
    engine.dispose()


@pytest.fixture
def secret_db_url(server_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """``server_url`` with SECRET as the password that really logs in (MariaDB) or is ignored."""
    url = sa.make_url(server_url)
    if url.get_backend_name() == "postgresql":  # trust authentication: any password passes
        yield url.set(password=SECRET).render_as_string(hide_password=False)
        return
    admin = request.getfixturevalue("mariadb_admin")
    user = f"cf_secret_{uuid.uuid4().hex[:8]}"
    # Test-made names (hex) and a constant: account statements take no bound parameters.
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{SECRET}'"))
        conn.execute(sa.text(f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'"))
    try:
        yield url.set(username=user, password=SECRET).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))


@pytest.fixture
def secret_redis_url(redis_url: str) -> Iterator[str]:
    """The test's Redis namespace, reached as an ACL user whose password is SECRET."""
    namespace = parse_qs(urlsplit(redis_url).query)["namespace"][0]
    user = f"cf-{RUN_ID}-{namespace.rsplit('-', 1)[-1]}"
    admin = redis.Redis.from_url(REDIS_BASE)
    admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{SECRET}"],
        keys=[f"{namespace}*"],  # Dramatiq's Lua scripts also get the bare namespace
        commands=["+@all"],
        channels=["*"],
    )
    parts = urlsplit(REDIS_BASE)
    try:
        where = f"{parts.hostname}:{parts.port or 6379}"
        yield f"redis://{user}:{SECRET}@{where}/0?namespace={namespace}"
    finally:
        admin.acl_deluser(user)
        admin.close()


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


def test_settings_repr_hides_both_passwords() -> None:
    settings = Settings(
        metadata_path="m:Base",
        database_url=f"postgresql://u:{SECRET}@db/app",
        broker_url=f"redis://:{SECRET}@cache:6379/0?password={SECRET}",
    )
    _no_secret(repr(settings), str(settings))
    assert "postgresql://u:***@db/app" in repr(settings)


def test_backfill_with_a_failing_batch_never_shows_the_password(
    tmp_path: Path, db: sa.Engine, secret_db_url: str, secret_redis_url: str, caplog
) -> None:  # noqa: ANN001
    seed(db, users=120)
    make_read_only(db, 77)  # every write to user 77 fails: one batch fails for good
    project = Project(tmp_path / "p", secret_db_url, broker_url=secret_redis_url)
    outputs = []
    with caplog.at_level(logging.DEBUG), project.worker(COUNTERFILL_MAX_RETRIES="0") as worker:
        failed = project.cli("enqueue", "--wait")
        outputs += [failed.output, str(failed.exception or "")]
        assert failed.exit_code == 1 and "user 77 is read-only" in failed.output
        for args in (["status"], ["status", "--json"], ["list"], ["verify"]):
            result = project.cli(*args)
            outputs += [result.output, str(result.exception or "")]
        log = worker.log
    assert "user 77 is read-only" in log and "Worker process is ready" in log
    _no_secret(log, caplog.text, *outputs)
    status = {s["counter"]: s for s in json.loads(project.cli("status", "--json").output)}
    assert status["users.followers_count"]["state"] == progress.FAILED
    assert [d for d in drift(db) if not 51 <= d[0] <= 100] == []  # the other batches applied


@pytest.mark.parametrize(
    "broker_url",
    [
        f"redis://:{SECRET}@127.0.0.1:notaport/0",
        f"redis://:{SECRET}@127.0.0.1:1/0",
        f"redis://127.0.0.1:1/0?password={SECRET}",
        f"amqp://guest:{SECRET}@127.0.0.1:notaport/",
        f"redis://:{SECRET}@[::1/0",
    ],
)
def test_bad_or_unreachable_broker_urls_are_one_line_without_the_password(
    tmp_path: Path, db: sa.Engine, server_url: str, broker_url: str
) -> None:
    seed(db, users=10)
    project = Project(tmp_path / "p", server_url, broker_url=broker_url)
    result = project.cli("enqueue")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    _no_secret(result.output)
    assert run_rows_count(db) == 0  # nothing half-written


def run_rows_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(progress.runs_table.name):
            return 0
        return conn.scalar(sa.select(sa.func.count()).select_from(progress.runs_table)) or 0


@pytest.mark.parametrize(
    "database_url",
    [
        f"postgresql+psycopg://u:{SECRET}@127.0.0.1:notaport/test",
        f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/test",
        f"postgresql+psycopg://u@127.0.0.1:1/test?password={SECRET}",
        f"mysql+pymysql://u:{SECRET}@127.0.0.1:notaport/test",
        f"mysql+pymysql://u:{SECRET}@127.0.0.1:1/test",
        f"mysql+pymysql://u@127.0.0.1:1/test?password={SECRET}",
    ],
)
def test_bad_or_unreachable_database_urls_are_one_line_without_the_password(
    tmp_path: Path, database_url: str
) -> None:
    project = Project(tmp_path / "p", database_url)
    for args in (["status"], ["enqueue"], ["verify"]):
        result = project.cli(*args)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        _no_secret(result.output)


def test_worker_start_up_errors_hide_the_password(tmp_path: Path, secret_db_url: str) -> None:
    """A malformed port stops the worker at start-up; an unreachable broker is retried.

    The database URL holds the password too (a real one on MariaDB).
    """
    for i, broker in enumerate(
        [f"redis://:{SECRET}@127.0.0.1:notaport/0", f"redis://:{SECRET}@127.0.0.1:1/0"]
    ):
        project = Project(tmp_path / f"p{i}", secret_db_url, broker_url=broker)
        log_path = project.path / "worker.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "dramatiq"), "alembic_counterfill.worker", "--processes", "1"],
                cwd=project.path,
                env=project.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            proc.wait(timeout=15)  # the malformed URL exits; the unreachable one keeps retrying
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        text = log_path.read_text(errors="replace")
        assert "127.0.0.1" in text or "notaport" in text or "port" in text, text
        _no_secret(text)
