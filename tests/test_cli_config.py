"""Settings: ``[counterfill]`` in alembic.ini, ``[tool.alembic.counterfill]``, env, load()."""

from __future__ import annotations

import sys
import uuid
from argparse import Namespace
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config

from alembic_counterfill import ConfigurationError, config

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, registry

from alembic_counterfill import counter_cache

PLAIN = sa.MetaData()
REGISTRY = registry()


class Base(DeclarativeBase):
    pass


class Shelf(Base):
    __tablename__ = "{prefix}_shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    books_count: Mapped[int] = counter_cache("Book.shelf_id")


class Book(Base):
    __tablename__ = "{prefix}_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int] = mapped_column(sa.ForeignKey("{prefix}_shelves.id"))
"""


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.BROKER_ENV, raising=False)
    monkeypatch.delenv("ALEMBIC_CONFIG", raising=False)


def _ini(path: Path, counterfill: str, url: str = "sqlite:///%(here)s/app.db") -> Path:
    path.write_text(f"[alembic]\nsqlalchemy.url = {url}\n\n[counterfill]\n{counterfill}")
    return path


def _settings(ini: Path | None = None, toml: Path | None = None, **opts: object) -> config.Settings:
    return config.from_alembic_config(
        Config(file_=ini, toml_file=toml, cmd_opts=Namespace(config=None, **opts))
    )


def test_ini_section_values(tmp_path: Path) -> None:
    ini = _ini(
        tmp_path / "alembic.ini",
        "metadata = app.models:Base\nbatch_size = 250\nqueue = counters\n"
        "broker_url = redis://localhost:6379/3\n",
    )
    settings = _settings(ini, raiseerr=True)
    assert settings.metadata_path == "app.models:Base"
    assert settings.batch_size == 250
    assert settings.queue == "counters"
    assert settings.broker_url == "redis://localhost:6379/3"
    assert settings.database_url == f"sqlite:///{tmp_path.as_posix()}/app.db"
    assert settings.raiseerr is True
    assert settings.config_file == str(ini)


def test_defaults_embedded_broker_and_alembics_url(tmp_path: Path) -> None:
    settings = _settings(_ini(tmp_path / "alembic.ini", "metadata = m:Base\n", url="sqlite://"))
    assert (settings.broker_url, settings.batch_size, settings.queue) == (
        None,
        10_000,
        "counterfill",
    )
    assert settings.database_url == "sqlite://"
    assert settings.raiseerr is False


def test_database_url_key_wins_over_sqlalchemy_url(tmp_path: Path) -> None:
    ini = _ini(tmp_path / "alembic.ini", "metadata = m:Base\ndatabase_url = sqlite:///other.db\n")
    assert _settings(ini).database_url == "sqlite:///other.db"


def test_broker_environment_variable_overrides(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(config.BROKER_ENV, "amqp://guest@rabbit/")
    ini = _ini(tmp_path / "alembic.ini", "metadata = m:Base\nbroker_url = redis://localhost/1\n")
    assert _settings(ini).broker_url == "amqp://guest@rabbit/"


def test_pyproject_table(tmp_path: Path) -> None:
    toml = tmp_path / "pyproject.toml"
    toml.write_text(
        "[tool.alembic.counterfill]\nmetadata = 'm:Base'\ndatabase_url = 'sqlite://'\n"
        "batch_size = 42\nqueue = 'q'\n"
    )
    settings = _settings(tmp_path / "alembic.ini", toml)  # no alembic.ini on disk
    assert (settings.metadata_path, settings.batch_size, settings.queue) == ("m:Base", 42, "q")
    assert settings.config_file == str(toml)


def test_ini_section_wins_over_pyproject_and_they_never_merge(tmp_path: Path) -> None:
    toml = tmp_path / "pyproject.toml"
    toml.write_text("[tool.alembic.counterfill]\nmetadata = 't:Base'\nqueue = 'from-toml'\n")
    ini = _ini(tmp_path / "alembic.ini", "metadata = i:Base\n")
    settings = _settings(ini, toml)
    assert (settings.metadata_path, settings.queue) == ("i:Base", "counterfill")


def test_no_database_url_at_all(tmp_path: Path) -> None:
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = m\n\n[counterfill]\nmetadata = m:Base\n")
    with pytest.raises(ConfigurationError, match="no database URL: set sqlalchemy.url in"):
        _settings(ini)


def test_load_reads_alembic_config_env_then_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _ini(tmp_path / "alembic.ini", "metadata = here:Base\n")
    other = _ini(tmp_path / "other.ini", "metadata = there:Base\n")
    assert config.load().metadata_path == "here:Base"
    assert config.load(str(other)).metadata_path == "there:Base"
    monkeypatch.setenv("ALEMBIC_CONFIG", str(other))
    assert config.load().metadata_path == "there:Base"


def test_load_names_a_missing_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="config file 'gone.ini' not found"):
        config.load("gone.ini")


def _models(tmp_path: Path) -> str:
    name = f"cf_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODELS.format(prefix=name))
    return name


def test_target_imports_from_the_config_files_directory(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    name = _models(project)
    monkeypatch.chdir(tmp_path)  # not the project directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    settings = config.load(str(_ini(project / "alembic.ini", f"metadata = {name}:Base\n")))
    assert settings.target().__name__ == "Base"
    assert [c.key for c in settings.counters()] == [f"{name}_shelves.books_count"]


@pytest.mark.parametrize("attribute", ["PLAIN", "REGISTRY", "Base.metadata"])
def test_target_accepts_metadata_and_registry(tmp_path: Path, monkeypatch, attribute) -> None:
    name = _models(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    settings = config.Settings(f"{name}:{attribute}", "sqlite://", None, config_file=None)
    monkeypatch.chdir(tmp_path)
    target = settings.target()
    module = sys.modules[name]
    named = {
        "PLAIN": module.PLAIN,
        "REGISTRY": module.REGISTRY,
        "Base.metadata": module.Base.metadata,
    }
    assert target is named[attribute]  # the very object named, not a stand-in
    # Counters resolve through it: the base's metadata has one, the empty holders none.
    expected = [f"{name}_shelves.books_count"] if attribute == "Base.metadata" else []
    assert [c.key for c in settings.counters()] == expected


def test_engine_is_created_once(tmp_path: Path) -> None:
    settings = config.Settings("m:Base", f"sqlite:///{tmp_path / 'x.db'}", None)
    (tmp_path / "x.db").touch()
    engine = settings.engine()
    assert isinstance(engine, sa.Engine)
    assert settings.engine() is engine
    engine.dispose()


#: (alembic.ini text or None, pyproject.toml text or None, ini section): files that
#: alembic's Config and config.FileConfig must read alike (values and errors).
PARITY = [
    (
        "[DEFAULT]\nroot = %(here)s/data\n\n[alembic]\nsqlalchemy.url = sqlite:///%(root)s/a.db\n\n"
        "[counterfill]\nmetadata = m:Base\nqueue = q-%(here)s\nbatch_size = 7\n",
        None,
        "alembic",
    ),
    (
        "[staging]\nsqlalchemy.url = postgresql://u:p%%40ss@h/db\n\n[counterfill]\n"
        "metadata = m:Base\nbroker_url = redis://h:6379/0\nbatch_seconds = 0.05\n",
        None,
        "staging",
    ),
    ("[counterfill]\nmetadata = m:Base\n", None, "alembic"),  # no [alembic] section
    ("[alembic]\nsqlalchemy.url = sqlite://\n", None, "alembic"),  # no [counterfill]
    ("[alembic]\nsqlalchemy.url = %(nope)s\n\n[counterfill]\nmetadata = m:Base\n", None, "alembic"),
    ("[alembic\nbroken", None, "alembic"),
    (
        None,
        "[tool.alembic.counterfill]\nmetadata = 'm:Base'\ndatabase_url = 'sqlite://'\n"
        "idle_batch_seconds = 2\n",
        "alembic",
    ),
    (None, "[tool.alembic]\ncounterfill = 3\n", "alembic"),
    (None, "[tool.alembic.counterfill\n", "alembic"),
    (
        "[alembic]\nsqlalchemy.url = sqlite://\n",
        "[tool.alembic.counterfill]\nmetadata = 't:B'\n",
        "alembic",
    ),
]


def _read(reader: str, ini: Path, toml: Path, section: str) -> object:
    opts = Namespace(config=None, name=section, raiseerr=False)
    if reader == "alembic":
        cfg: object = Config(
            file_=str(ini), toml_file=str(toml), ini_section=section, cmd_opts=opts
        )
    else:
        cfg = config.FileConfig(str(ini), str(toml), section, opts)
    try:
        return config.from_alembic_config(cfg)  # type: ignore[arg-type]
    except ConfigurationError as exc:
        return f"ConfigurationError: {exc}"


@pytest.mark.parametrize(("ini_text", "toml_text", "section"), PARITY)
def test_the_console_scripts_reader_reads_files_as_alembic_does(
    tmp_path: Path, ini_text: str | None, toml_text: str | None, section: str
) -> None:
    """FileConfig (no alembic import) gives the Settings, or error, that alembic's Config does."""
    ini, toml = tmp_path / "alembic.ini", tmp_path / "pyproject.toml"
    if ini_text is not None:
        ini.write_text(ini_text)
    if toml_text is not None:
        toml.write_text(toml_text)
    expected = _read("alembic", ini, toml, section)
    found = _read("file", ini, toml, section)
    assert found == expected
    if isinstance(expected, config.Settings):
        assert repr(found) == repr(expected)
