"""Temporary alembic projects for end-to-end tests: real ``alembic init``, real executables.

A template made once by ``alembic init`` is copied per test; env.py is edited
the way the docs tell users to (import the models, opt in to the plugin), and
commands run as subprocesses of the ``alembic`` / ``alembic-counterfill``
executables installed next to this interpreter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
ALEMBIC = str(BIN / "alembic")
ALEMBIC_COUNTERFILL = str(BIN / "alembic-counterfill")

#: Models before any counter column exists on ``users`` (``forums`` is born with one).
MODELS_V1 = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alembic_counterfill import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
{user_counters}

class Follow(Base):
    __tablename__ = "follows"
    id: Mapped[int] = mapped_column(primary_key=True)
    follower_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    followed_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    published: Mapped[bool] = mapped_column(default=False)
    likes: Mapped[int] = mapped_column(default=0)


class Forum(Base):
    __tablename__ = "forums"
    id: Mapped[int] = mapped_column(primary_key=True)
    topics_count: Mapped[int] = counter_cache("Topic.forum_id")


class Topic(Base):
    __tablename__ = "topics"
    id: Mapped[int] = mapped_column(primary_key=True)
    forum_id: Mapped[int] = mapped_column(sa.ForeignKey("forums.id"))
"""

USER_COUNTERS = """\
    followers_count: Mapped[int] = counter_cache("Follow.followed_id")
    posts_count: Mapped[int] = counter_cache(
        "Post.author_id", where=lambda: Post.published.is_(True)
    )
    likes_total: Mapped[int] = counter_cache("Post.author_id", sum="likes")
"""


def models_source(with_user_counters: bool) -> str:
    """The models module, with or without the three counters on ``users``."""
    return MODELS_V1.format(user_counters=USER_COUNTERS if with_user_counters else "")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: no stray config from the caller, no stale bytecode."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("ALEMBIC_CONFIG", "COUNTERFILL_BROKER_URL")
    }
    # models.py is rewritten within the same second: never let a stale .pyc win.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run(
    args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output as text (never raises on a non-zero exit)."""
    return subprocess.run(
        args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


def init_template(where: Path) -> Path:
    """Run the real ``alembic init`` once; return the directory to copy for each project."""
    where.mkdir(parents=True, exist_ok=True)
    result = run([ALEMBIC, "init", "migrations"], cwd=where)
    assert result.returncode == 0, result.stderr
    return where


@dataclass
class Project:
    """One temporary alembic project on its own database."""

    root: Path
    db_url: str

    def alembic(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``alembic`` executable in the project directory."""
        return run([ALEMBIC, *args], cwd=self.root, env=env)

    def counterfill(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``alembic-counterfill`` console script in the project directory."""
        return run([ALEMBIC_COUNTERFILL, *args], cwd=self.root, env=env)

    def ok(self, *args: str) -> str:
        """Run ``alembic ARGS``, assert it succeeded, and return its stdout."""
        result = self.alembic(*args)
        assert result.returncode == 0, (
            f"alembic {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        )
        return result.stdout

    def write_models(self, with_user_counters: bool) -> None:
        """(Re)write ``models.py``."""
        (self.root / "models.py").write_text(models_source(with_user_counters))

    def revisions(self) -> list[Path]:
        """Revision files, oldest first (by creation order)."""
        files = (self.root / "migrations" / "versions").glob("*.py")
        return sorted(files, key=lambda p: p.stat().st_mtime_ns)

    def autogenerate(self, message: str) -> str:
        """``alembic revision --autogenerate``; return the new revision file's text."""
        before = set(self.revisions())
        self.ok("revision", "--autogenerate", "-m", message)
        (new,) = set(self.revisions()) - before
        return new.read_text()


def body(revision_text: str, function: str) -> list[str]:
    """The generated lines of ``upgrade`` or ``downgrade``, without alembic's marker comments."""
    match = re.search(
        rf"def {function}\(\) -> None:\n(.*?)# ### end Alembic commands ###",
        revision_text,
        re.S,
    )
    assert match, revision_text
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    return [line for line in lines if not line.strip().startswith("# ###")]


def ini_value(value: str) -> str:
    """Escape ``%`` for configparser (alembic.ini interpolates)."""
    return value.replace("%", "%%")


ENV_PATCH = """\
from models import Base

target_metadata = Base.metadata
COUNTERFILL_OPTS = dict(
    autogenerate_plugins=["alembic.autogenerate.*", "alembic_counterfill"],
    render_as_batch={batch!r},
)
"""


def make_project(
    template: Path, dest: Path, db_url: str, *, with_user_counters: bool = False
) -> Project:
    """Copy the ``alembic init`` template to ``dest`` and wire it to ``db_url`` and the models."""
    shutil.copytree(template, dest)
    env_py = dest / "migrations" / "env.py"
    source = env_py.read_text()
    batch = db_url.startswith("sqlite")
    source = source.replace("target_metadata = None\n", ENV_PATCH.format(batch=batch), 1)
    # Both configure() calls (offline and online) opt in, as docs/cli.md tells users to.
    source = source.replace(
        "target_metadata=target_metadata", "target_metadata=target_metadata, **COUNTERFILL_OPTS"
    )
    assert source.count("**COUNTERFILL_OPTS") == 2, source
    env_py.write_text(source)
    ini = dest / "alembic.ini"
    text = ini.read_text().replace(
        "sqlalchemy.url = driver://user:pass@localhost/dbname",
        f"sqlalchemy.url = {ini_value(db_url)}",
    )
    text += textwrap.dedent(
        """
        [counterfill]
        metadata = models:Base
        batch_size = 100
        """
    )
    ini.write_text(text)
    project = Project(dest, db_url)
    project.write_models(with_user_counters)
    return project
