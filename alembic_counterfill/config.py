"""Settings: the ``[counterfill]`` configuration read from alembic.ini or pyproject.toml.

The CLI builds :class:`Settings` from the alembic :class:`~alembic.config.Config`
it runs under (so ``-c``, ``-n`` and ``-x`` apply); workers call :func:`load`.
"""

from __future__ import annotations

import configparser
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .errors import ConfigurationError, DatabaseError
from .pacing import IDLE_TARGET_SECONDS, TARGET_SECONDS, Pacing
from .resend import RESEND_AFTER_SECONDS
from .signals import LOCK_TIMEOUT_MS, MAX_REPLICA_LAG_SECONDS, Throttle
from .urls import redact

if TYPE_CHECKING:
    from alembic.config import Config

    from .counters import Counter

#: Name of the ini section and of the ``[tool.alembic.<name>]`` table in pyproject.toml.
SECTION = "counterfill"
#: Environment variable that overrides ``broker_url``.
BROKER_ENV = "COUNTERFILL_BROKER_URL"
#: The package extra that installs the driver of each database backend.
DRIVER_EXTRAS = {"postgresql": "postgresql"}
KEYS = frozenset(
    {
        "metadata",
        "broker_url",
        "database_url",
        "batch_size",
        "queue",
        # Adaptive, throttled backfills (docs/backfilling.md).
        "batch_seconds",
        "idle_batch_seconds",
        "max_rows_per_second",
        "lock_timeout_ms",
        "max_replica_lag_seconds",
        "throttle_lock_waiters",
        "throttle_autovacuum",
        # RabbitMQ: when `enqueue` re-sends a batch whose message may be lost (resend.py).
        "resend_after_seconds",
    }
)


@dataclass
class Settings:
    """Everything the CLI and the workers need to find the models, the database and the broker.

    :param metadata_path: ``"package.module:Base"``; a declarative base, registry or MetaData.
    :param database_url: ``[counterfill] database_url``, else alembic's ``sqlalchemy.url``.
    :param broker_url: Dramatiq broker URL; ``None`` runs batches in-process (embedded).
    :param batch_size: parent rows per backfill batch.
    :param queue: Dramatiq queue the batch messages go to.
    :param raiseerr: show full tracebacks instead of one-line errors (alembic's ``--raiseerr``).
    :param config_file: the file the settings came from (named in error messages).
    :param pacing: target duration and bounds of adaptive batch transactions.
    :param throttle: the database signals batches back off on.
    :param max_rows_per_second: optional rate limit of a backfill (parents per second).
    :param resend_after_seconds: on RabbitMQ, age after which a sent batch that no
        worker picked up is sent again by ``enqueue`` (see :mod:`.resend`).
    """

    metadata_path: str
    database_url: str
    broker_url: str | None
    batch_size: int = 10_000
    queue: str = "counterfill"
    raiseerr: bool = False
    config_file: str | None = None
    pacing: Pacing = field(default_factory=Pacing)
    throttle: Throttle = field(default_factory=Throttle)
    max_rows_per_second: float | None = None
    resend_after_seconds: float = RESEND_AFTER_SECONDS
    _engine: sa.Engine | None = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: never show a password.
        broker = redact(self.broker_url) if self.broker_url else None
        return (
            f"Settings(metadata_path={self.metadata_path!r}, "
            f"database_url={redact(self.database_url)!r}, broker_url={broker!r}, "
            f"batch_size={self.batch_size!r}, queue={self.queue!r}, "
            f"raiseerr={self.raiseerr!r}, config_file={self.config_file!r})"
        )

    def target(self) -> Any:
        """Import and return the object named by ``metadata`` (``"package.module:attribute"``)."""
        where = f"[{SECTION}] metadata in {self.config_file or 'the configuration'}"
        module_name, sep, attr = self.metadata_path.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigurationError(
                f"{where} is {self.metadata_path!r}, not 'package.module:Base'; "
                "write the import path of your declarative base, e.g. myapp.models:Base"
            )
        for entry in self._search_path():
            if entry not in sys.path:
                sys.path.insert(0, entry)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise ConfigurationError(
                    f"{where}: cannot import module {module_name!r} ({exc}); fix the import "
                    "path or run from the project directory"
                ) from exc
            raise ConfigurationError(
                f"{where}: importing {module_name!r} failed: {exc}; install the missing package"
            ) from exc
        except Exception as exc:  # user code failing at import: name it, don't dump it
            raise ConfigurationError(
                f"{where}: importing {module_name!r} raised {type(exc).__name__}: {exc}; "
                "fix the models module"
            ) from exc
        target = module
        for part in attr.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ConfigurationError(
                    f"{where}: module {module_name!r} has no attribute {attr!r}; "
                    "name your declarative base, registry or MetaData"
                ) from None
        if not _is_metadata_holder(target):
            raise ConfigurationError(
                f"{where}: {self.metadata_path!r} ({type(target).__name__}) is not a "
                "declarative base, registry or MetaData; name your declarative base"
            )
        return target

    def counters(self) -> list[Counter]:
        """Every counter declared in the configured models, sorted by key."""
        from .counters import counters_of

        return counters_of(self.target())

    def engine(self) -> sa.Engine:
        """The engine on ``database_url``, created on first use and then reused."""
        if self._engine is None:
            self._engine = _create_engine(self.database_url, self.config_file)
        return self._engine

    def _search_path(self) -> list[str]:
        # Like alembic's prepend_sys_path = ".": models usually sit next to the config file.
        entries = [os.getcwd()]
        if self.config_file:
            entries.insert(0, str(Path(self.config_file).resolve().parent))
        return entries


def _is_metadata_holder(target: Any) -> bool:
    from sqlalchemy.orm import registry

    return isinstance(target, sa.MetaData | registry) or isinstance(
        getattr(target, "metadata", None), sa.MetaData
    )


def _create_engine(url: str, config_file: str | None) -> sa.Engine:
    where = config_file or "the configuration"
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigurationError(
            f"database URL {redact(url)!r} in {where} is not a SQLAlchemy URL; set "
            f"sqlalchemy.url (or [{SECTION}] database_url) to e.g. "
            "postgresql+psycopg://user@host:5432/db"
        ) from None
    database = parsed.database
    if (
        parsed.get_backend_name() == "sqlite"
        and database
        and database != ":memory:"
        and not database.startswith("file:")
        and not Path(database).exists()
    ):
        # sqlite would silently create an empty file: a typo must not look like "no counters".
        raise DatabaseError(
            f"SQLite database {database!r} does not exist; fix sqlalchemy.url (or "
            f"[{SECTION}] database_url) in {where}, or run alembic upgrade head first"
        )
    try:
        return sa.create_engine(parsed)
    except (ImportError, sa.exc.ArgumentError) as exc:
        extra = DRIVER_EXTRAS.get(parsed.get_backend_name())
        fix = (
            f"install it with pip install 'alembic_counterfill[{extra}]'"
            if extra and isinstance(exc, ImportError)
            else "install the driver or fix the URL"
        )
        raise ConfigurationError(
            f"cannot use database URL {redact(str(url))!r}: {exc}; " + fix
        ) from None


class FileConfig:
    """The part of alembic's ``Config`` that :func:`from_alembic_config` reads, without alembic.

    ``import alembic.config`` imports all of alembic (migration context, every
    dialect's DDL, Mako), a sixth of ``alembic-counterfill``'s start-up
    (docs/performance.md), for a command that reads two sections of a file.
    The files are read as alembic 1.16+ reads them: the ini file by a
    ``ConfigParser`` whose defaults hold ``here`` (the file's directory), in
    the locale's encoding; ``[tool.alembic]`` of pyproject.toml.
    """

    def __init__(
        self, file_: str | None, toml_file: str | None, ini_section: str, cmd_opts: Any
    ) -> None:
        self.config_file_name = file_
        self.toml_file_name = toml_file
        self.config_ini_section = ini_section
        self.cmd_opts = cmd_opts
        self._file_config: configparser.ConfigParser | None = None

    @property
    def file_config(self) -> configparser.ConfigParser:
        """The ini file, parsed once."""
        if self._file_config is None:
            path = Path(self.config_file_name) if self.config_file_name else None
            here = path.absolute().parent if path else Path()
            parser = configparser.ConfigParser({"here": here.as_posix()})
            if path:
                parser.read([path], encoding="locale")
            else:
                parser.add_section(self.config_ini_section)
            self._file_config = parser
        return self._file_config

    @property
    def toml_alembic_config(self) -> dict[str, Any]:
        """``[tool.alembic]`` of the pyproject.toml file (empty without one)."""
        if not self.toml_file_name or not Path(self.toml_file_name).exists():
            return {}
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # alembic depends on tomli there
            import tomli as tomllib
        with open(self.toml_file_name, "rb") as f:
            data = tomllib.load(f).get("tool", {}).get("alembic", {})
        if not isinstance(data, dict):
            raise ValueError("Incorrect TOML format")
        return data

    def get_section(self, name: str, default: dict[str, str]) -> dict[str, str]:
        """The options of section ``name`` (defaults included), or ``default`` without one."""
        if not self.file_config.has_section(name):
            return default
        return dict(self.file_config.items(name))

    def get_main_option(self, name: str) -> str | None:
        """Option ``name`` of the main section (``[alembic]`` unless ``-n`` named another)."""
        section = self.config_ini_section
        if not self.file_config.has_section(section):
            raise ConfigurationError(
                f"No config file {self.config_file_name!r} found, or file has no "
                f"'[{section}]' section"
            )
        if self.file_config.has_option(section, name):
            return self.file_config.get(section, name)
        return None


def from_alembic_config(cfg: Config | FileConfig) -> Settings:
    """Build :class:`Settings` from alembic's ``Config`` or a :class:`FileConfig`."""
    opts = cfg.cmd_opts
    for given in getattr(opts, "config", None) or ():
        # A file named with -c (or $ALEMBIC_CONFIG) must exist; alembic would not insist.
        if not Path(given).exists():
            raise ConfigurationError(
                f"config file {given!r} not found; pass -c with the path of your alembic.ini"
            )
    ini = cfg.config_file_name
    ini_exists = ini is not None and Path(ini).exists()
    # One source, never a merge: the ini section wins over [tool.alembic.counterfill].
    values: dict[str, Any] = {}
    source = None
    if ini_exists:
        try:
            has_section = cfg.file_config.has_section(SECTION)
        except Exception as exc:  # configparser errors: bad syntax, bad interpolation
            raise ConfigurationError(f"cannot read {ini!r}: {exc}; fix the ini syntax") from None
        if has_section:
            defaults = cfg.file_config.defaults()
            section = cfg.get_section(SECTION, {})
            values = {k: v for k, v in section.items() if k not in defaults}
            source = ini
    toml = cfg.toml_file_name
    if source is None and toml and Path(toml).exists():
        try:
            table = cfg.toml_alembic_config.get(SECTION)
        except Exception as exc:  # tomllib.TOMLDecodeError, alembic's CommandError
            raise ConfigurationError(f"cannot read {toml!r}: {exc}; fix the TOML syntax") from None
        if isinstance(table, dict):
            values = dict(table)
            source = toml
    if source is None:
        if not ini_exists and not (toml and Path(toml).exists()):
            raise ConfigurationError(
                f"config file {ini or 'alembic.ini'!r} not found; run from the directory "
                "holding alembic.ini or pass -c path/to/alembic.ini"
            )
        where = ini if ini_exists else toml
        raise ConfigurationError(
            f"no [{SECTION}] section in {where}; add one with "
            "metadata = yourapp.models:Base (see docs/cli.md)"
        )
    unknown = sorted(set(values) - KEYS)
    if unknown:
        raise ConfigurationError(
            f"unknown key {unknown[0]!r} in [{SECTION}] of {source}; "
            f"known keys: {', '.join(sorted(KEYS))}"
        )
    metadata = str(values.get("metadata") or "").strip()
    if not metadata:
        raise ConfigurationError(
            f"no metadata key in [{SECTION}] of {source}; add metadata = yourapp.models:Base"
        )
    database_url = str(values.get("database_url") or "").strip()
    if not database_url and ini_exists:
        try:
            database_url = (cfg.get_main_option("sqlalchemy.url") or "").strip()
        except Exception as exc:  # configparser interpolation errors ("%" not doubled)
            raise ConfigurationError(
                f"cannot read sqlalchemy.url in {ini}: {exc}; write % as %% in ini files"
            ) from None
    if not database_url:
        raise ConfigurationError(
            f"no database URL: set sqlalchemy.url in [{cfg.config_ini_section}] or "
            f"database_url in [{SECTION}] of {source}"
        )
    broker_url = os.environ.get(BROKER_ENV) or str(values.get("broker_url") or "").strip() or None
    batch_seconds = _number(values.get("batch_seconds"), "batch_seconds", source, 0.1)
    idle_seconds = _number(values.get("idle_batch_seconds"), "idle_batch_seconds", source, 1.0)

    def setting(key: str, default: float, example: float) -> float:
        if values.get(key) in (None, ""):
            return default
        return _number(values.get(key), key, source, example, zero=True)

    throttle = Throttle(
        lock_timeout_ms=int(setting("lock_timeout_ms", LOCK_TIMEOUT_MS, 2000)),
        lock_waiters=_flag(values.get("throttle_lock_waiters"), "throttle_lock_waiters", source),
        autovacuum=_flag(values.get("throttle_autovacuum"), "throttle_autovacuum", source),
        max_replica_lag_seconds=setting("max_replica_lag_seconds", MAX_REPLICA_LAG_SECONDS, 30),
    )
    rate = values.get("max_rows_per_second")
    return Settings(
        metadata_path=metadata,
        database_url=database_url,
        broker_url=broker_url,
        batch_size=_positive_int(values.get("batch_size", 10_000), "batch_size", source),
        queue=str(values.get("queue") or "counterfill").strip(),
        raiseerr=bool(getattr(opts, "raiseerr", False)),
        config_file=source,
        pacing=Pacing(
            target_seconds=batch_seconds or TARGET_SECONDS,
            idle_target_seconds=idle_seconds or IDLE_TARGET_SECONDS,
        ),
        throttle=throttle,
        max_rows_per_second=(
            _number(rate, "max_rows_per_second", source, 5000) if rate not in (None, "") else None
        ),
        resend_after_seconds=setting("resend_after_seconds", RESEND_AFTER_SECONDS, 300),
    )


def _number(value: Any, key: str, source: str, example: float, *, zero: bool = False) -> float:
    """A positive number (or zero when ``zero``) from the section; None/empty gives 0."""
    if value is None or str(value).strip() == "":
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number < 0 or (number == 0 and not zero):
        raise ConfigurationError(
            f"[{SECTION}] {key} in {source} is {value!r}; give a "
            f"{'non-negative' if zero else 'positive'} number, e.g. {example:g}"
        )
    return number


def _flag(value: Any, key: str, source: str) -> bool:
    """A boolean key (default true): true/false, yes/no, on/off, 1/0."""
    if value is None or isinstance(value, bool):
        return True if value is None else value
    text = str(value).strip().lower()
    if text in ("", "1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"[{SECTION}] {key} in {source} is {value!r}; give true or false")


def _positive_int(value: Any, key: str, source: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigurationError(
            f"[{SECTION}] {key} in {source} is {value!r}; give a positive integer, e.g. 10000"
        )
    return number


def config_files(given: Sequence[str]) -> tuple[str, str]:
    """(pyproject.toml, ini) the way alembic's own command line chooses them.

    Each file given (``-c``) sets its kind; ``$ALEMBIC_CONFIG`` and then
    ``pyproject.toml`` / ``alembic.ini`` in the current directory fill the rest.
    """
    env = os.environ.get("ALEMBIC_CONFIG")
    toml, ini = "pyproject.toml", "alembic.ini"
    if env and Path(env).name == "pyproject.toml":
        toml = env
    elif env:
        ini = env
    for name in given:
        if Path(name).name == "pyproject.toml":
            toml = name
        else:
            ini = name
    return toml, ini


def load(config_file: str | None = None, name: str = "alembic") -> Settings:
    """Settings for a worker: ``config_file``, else ``$ALEMBIC_CONFIG``, else ./alembic.ini.

    A pyproject.toml (given as ``config_file`` or ``$ALEMBIC_CONFIG``, or found
    in the current directory) supplies ``[tool.alembic.counterfill]``.
    """
    from argparse import Namespace

    from alembic.config import Config

    chosen = config_file or os.environ.get("ALEMBIC_CONFIG")
    if not chosen and not Path("alembic.ini").exists() and not Path("pyproject.toml").exists():
        raise ConfigurationError(
            f"no alembic.ini in {os.getcwd()}; start the worker in the project directory "
            "or set ALEMBIC_CONFIG=/path/to/alembic.ini (dramatiq has no -c option)"
        )
    toml, ini_file = config_files([config_file] if config_file else [])
    ini: str | None = ini_file
    if config_file and Path(config_file).name == "pyproject.toml":
        ini = None  # a worker given only its pyproject.toml reads no ini file
    cfg = Config(
        file_=ini,
        toml_file=toml,
        ini_section=name,
        cmd_opts=Namespace(config=[chosen] if chosen else None, raiseerr=False),
    )
    return from_alembic_config(cfg)
