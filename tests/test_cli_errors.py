"""Bad input: one line naming the problem and the fix, a non-zero exit, no traceback, no writes.

Every case runs the real ``alembic`` or ``alembic-counterfill`` executable in
a small project (a models module, an ini file and a SQLite database holding
one pending request).
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import MARIADB_ADMIN_URL, PG_ADMIN_URL
from projects import ALEMBIC, ALEMBIC_COUNTERFILL, clean_env, ini_value

from alembic_counterfill import progress

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache

NOT_A_BASE = 42


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    followers_count: Mapped[int] = counter_cache("Follow.followed_id")


class Follow(Base):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
"""

Completed = subprocess.CompletedProcess[str]
SECTION = "[counterfill]\nmetadata = models:Base\n"


@dataclass
class Setup:
    """The project directory and its database file."""

    root: Path
    db: Path

    def write_ini(self, counterfill: str = SECTION, url: str | None = None) -> None:
        url = url or f"sqlite:///{self.db}"
        text = f"[alembic]\nscript_location = migrations\nsqlalchemy.url = {ini_value(url)}\n\n"
        (self.root / "alembic.ini").write_text(text + counterfill)

    def digest(self) -> str:
        return hashlib.sha256(self.db.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "models.py").write_text(MODELS)
    (root / "broken_models.py").write_text("raise ValueError('settings module missing')\n")
    db = root / "app.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        progress.ensure_tables(conn)
        for statement in progress.request_statements(
            "users.followers_count", "users", "followers_count", None
        ):
            conn.execute(statement)
    engine.dispose()
    return Setup(root, db)


def _run(
    setup: Setup, args: list[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd or setup.root, capture_output=True, text=True, env=clean_env(), timeout=60
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("Error: ")
    for fragment in fragments:
        assert fragment in line
    return line


ALEMBIC_STATUS = [ALEMBIC, "counterfill", "status"]
CONSOLE_STATUS = [ALEMBIC_COUNTERFILL, "status"]

# (id, [counterfill] section, command, fragments naming the problem and the fix)
CONFIG_CASES = [
    (
        "no-section",
        "",
        ALEMBIC_STATUS,
        ["no [counterfill] section in alembic.ini", "metadata = yourapp.models:Base"],
    ),
    (
        "no-metadata-key",
        "[counterfill]\nbatch_size = 5\n",
        CONSOLE_STATUS,
        ["no metadata key in [counterfill] of alembic.ini", "add metadata = "],
    ),
    (
        "module-not-found",
        "[counterfill]\nmetadata = nosuch.models:Base\n",
        ALEMBIC_STATUS,
        ["cannot import module 'nosuch.models'", "fix the import path"],
    ),
    (
        "attribute-missing",
        "[counterfill]\nmetadata = models:Bsae\n",
        CONSOLE_STATUS,
        ["module 'models' has no attribute 'Bsae'", "name your declarative base"],
    ),
    (
        "not-an-import-path",
        "[counterfill]\nmetadata = models.Base\n",
        ALEMBIC_STATUS,
        ["'models.Base', not 'package.module:Base'", "e.g. myapp.models:Base"],
    ),
    (
        "not-a-base",
        "[counterfill]\nmetadata = models:NOT_A_BASE\n",
        ALEMBIC_STATUS,
        ["'models:NOT_A_BASE' (int) is not a declarative base", "name your declarative base"],
    ),
    (
        "models-raise",
        "[counterfill]\nmetadata = broken_models:Base\n",
        ALEMBIC_STATUS,
        ["importing 'broken_models' raised ValueError: settings module missing", "fix the models"],
    ),
    (
        "unknown-key",
        SECTION + "batchsize = 5\n",
        ALEMBIC_STATUS,
        ["unknown key 'batchsize' in [counterfill] of alembic.ini", "known keys:", "batch_size"],
    ),
    (
        "bad-batch-size",
        SECTION + "batch_size = lots\n",
        CONSOLE_STATUS,
        ["batch_size in alembic.ini is 'lots'", "give a positive integer"],
    ),
]


@pytest.mark.parametrize(
    "section, command, fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_configuration(setup: Setup, section: str, command: list[str], fragments) -> None:
    setup.write_ini(section)
    before = setup.digest()
    _assert_one_line_error(_run(setup, command), *fragments)
    assert setup.digest() == before


@pytest.mark.parametrize("command", [ALEMBIC_STATUS, CONSOLE_STATUS], ids=["alembic", "console"])
def test_unknown_counter_name_is_a_usage_error(setup: Setup, command: list[str]) -> None:
    setup.write_ini()
    before = setup.digest()
    result = _run(setup, [*command, "users.folowers_count"])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for COUNTER: unknown counter 'users.folowers_count'; "
        "declared counters: users.followers_count"
    )
    assert setup.digest() == before


@pytest.mark.parametrize(
    "command",
    [
        [ALEMBIC, "-c", "nope.ini", "counterfill", "status"],
        [ALEMBIC_COUNTERFILL, "-c", "nope.ini", "list"],
    ],
    ids=["alembic", "console"],
)
def test_config_file_that_does_not_exist(setup: Setup, command: list[str]) -> None:
    setup.write_ini()
    _assert_one_line_error(
        _run(setup, command), "config file 'nope.ini' not found", "pass -c with the path"
    )


def test_no_alembic_ini_in_the_current_directory(setup: Setup, tmp_path: Path) -> None:
    _assert_one_line_error(
        _run(setup, ALEMBIC_STATUS, cwd=tmp_path),
        "config file 'alembic.ini' not found",
        "pass -c path/to/alembic.ini",
    )


def test_sqlite_database_that_does_not_exist_is_not_created(setup: Setup) -> None:
    missing = setup.root / "typo.db"
    setup.write_ini(url=f"sqlite:///{missing}")
    _assert_one_line_error(
        _run(setup, ALEMBIC_STATUS),
        f"SQLite database '{missing}' does not exist",
        "fix sqlalchemy.url",
    )
    assert not missing.exists()


def _pg_url(**parts: object) -> str:
    return sa.engine.make_url(PG_ADMIN_URL).set(**parts).render_as_string(hide_password=False)


def test_unreachable_database(setup: Setup) -> None:
    setup.write_ini(url=_pg_url(port=1))
    line = _assert_one_line_error(
        _run(setup, ALEMBIC_STATUS),
        "cannot use database postgresql+psycopg://",
        "check sqlalchemy.url",
    )
    assert ":1/" in line


def test_database_that_does_not_exist(setup: Setup, pg_admin: sa.Engine) -> None:
    setup.write_ini(url=_pg_url(database="counterfill_no_such_db"))
    _assert_one_line_error(
        _run(setup, CONSOLE_STATUS), 'database "counterfill_no_such_db" does not exist'
    )


def _mariadb_url(**parts: object) -> str:
    return sa.engine.make_url(MARIADB_ADMIN_URL).set(**parts).render_as_string(False)


def test_unreachable_mariadb(setup: Setup) -> None:
    setup.write_ini(url=_mariadb_url(port=1, database="app"))
    line = _assert_one_line_error(
        _run(setup, ALEMBIC_STATUS), "cannot use database mysql+pymysql://", "check sqlalchemy.url"
    )
    assert ":1/" in line


def test_mariadb_database_that_does_not_exist(setup: Setup, mariadb_admin: sa.Engine) -> None:
    setup.write_ini(url=_mariadb_url(database="counterfill_no_such_db"))
    _assert_one_line_error(_run(setup, CONSOLE_STATUS), "Unknown database 'counterfill_no_such_db'")


def test_url_that_is_not_a_url(setup: Setup) -> None:
    setup.write_ini(url="localhost:5432/app")
    _assert_one_line_error(
        _run(setup, ALEMBIC_STATUS), "is not a SQLAlchemy URL", "set sqlalchemy.url"
    )


def test_url_whose_driver_is_not_installed(setup: Setup) -> None:
    setup.write_ini(url="mssql+pymssql://app@localhost/app")
    _assert_one_line_error(_run(setup, ALEMBIC_STATUS), "install the driver or fix the URL")


@pytest.mark.parametrize(
    "args, message",
    [
        ([ALEMBIC, "counterfill", "status", "--bogus"], "No such option '--bogus'"),
        ([ALEMBIC, "counterfill", "enqueu"], "No such command 'enqueu'"),
        ([ALEMBIC_COUNTERFILL, "status", "--interval", "0"], "Invalid value for '--interval'"),
    ],
    ids=["option", "command", "value"],
)
def test_usage_errors_exit_2(setup: Setup, args: list[str], message: str) -> None:
    setup.write_ini()
    result = _run(setup, args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [ALEMBIC, "--raiseerr", "counterfill", "status"],
        [ALEMBIC_COUNTERFILL, "--raiseerr", "status"],
    ],
    ids=["alembic", "console"],
)
def test_raiseerr_shows_the_traceback(setup: Setup, args: list[str]) -> None:
    setup.write_ini("[counterfill]\nmetadata = nosuch.models:Base\n")
    result = _run(setup, args)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigurationError: [counterfill] metadata in alembic.ini" in result.stderr
