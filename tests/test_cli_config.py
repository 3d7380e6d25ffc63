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
