"""Command line of the example: ``python -m example_project seed|profile|demo``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy as sa

from .errors import ExampleError

F = TypeVar("F", bound=Callable[..., Any])


def resolve_url(config: str | None, database_url: str | None) -> str:
    """The database URL: ``--database-url``, else the alembic config's, like the counterfill CLI.

    The config is ``-c``, else ``$ALEMBIC_CONFIG``, else ``./alembic.ini``;
    its ``[counterfill] database_url`` wins over ``[alembic] sqlalchemy.url``.
    """
    if database_url:
        return database_url
    path = config or os.environ.get("ALEMBIC_CONFIG") or "alembic.ini"
    if not Path(path).is_file():
        raise ExampleError(
            f"no database given and no alembic config at {path!r}; "
            "pass --database-url URL or -c path/to/alembic.ini"
        )
    from alembic.config import Config

    cfg = Config(path)
    url = cfg.get_section_option("counterfill", "database_url") or cfg.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise ExampleError(f"{path} has no sqlalchemy.url; add it under [alembic]")
    return url


@contextmanager
def reported() -> Iterator[None]:
    """Turn expected failures into one line on stderr and exit status 1, without a traceback."""
    from alembic_counterfill import CounterfillError

    try:
        yield
    except (ExampleError, CounterfillError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except sa.exc.OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        click.echo(f"error: cannot use the database: {first}; check the URL", err=True)
        sys.exit(1)
    except sa.exc.ArgumentError as exc:
        click.echo(f"error: bad database URL: {exc}; use e.g. sqlite:///app.db", err=True)
        sys.exit(1)


def database_options(fn: F) -> F:
    """Add ``-c/--config`` and ``--database-url`` to a command."""
    fn = click.option(
        "--database-url",
        envvar="DATABASE_URL",
        help="SQLAlchemy URL; default: the alembic config's [counterfill] database_url "
        "or sqlalchemy.url.",
    )(fn)
    fn = click.option(
        "-c",
        "--config",
        type=click.Path(dir_okay=False),
        help="Alembic config to read the URL from (default: $ALEMBIC_CONFIG, ./alembic.ini).",
    )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The alembic_counterfill example: a social app whose counters a bulk load made stale."""


@main.command()
@database_options
@click.option("--users", type=int, default=1000, show_default=True, help="Users to create.")
@click.option(
    "--seed",
    "seed_value",
    type=int,
    default=42,
    show_default=True,
    help="Random seed; the same seed loads the same rows.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def seed(
    config: str | None, database_url: str | None, users: int, seed_value: int, progress: bool
) -> None:
    """Load USERS users with ~10 follows and ~5 posts each, bypassing the ORM."""
    from .seed import seed as run_seed

    with reported():
        engine = sa.create_engine(resolve_url(config, database_url))
        try:
            with engine.begin() as connection:
                result = run_seed(connection, users, seed_value, progress=progress)
        finally:
            engine.dispose()
        click.echo(result.summary())


@main.command()
@database_options
@click.option("--user", "user_id", type=int, help="User to profile (default: most followers).")
@click.option("--repeat", type=int, default=20, show_default=True, help="Timed runs per query.")
def profile(config: str | None, database_url: str | None, user_id: int | None, repeat: int) -> None:
    """Time the profile read with COUNT(*) against the counter columns, side by side."""
    from .profile import compare

    with reported():
        engine = sa.create_engine(resolve_url(config, database_url))
        try:
            with engine.connect() as connection:
                result = compare(connection, user_id=user_id, repeat=repeat)
        finally:
            engine.dispose()
        click.echo(result.report())


@main.command()
@click.option("--users", type=int, default=100_000, show_default=True, help="Users to generate.")
@click.option(
    "--seed", "seed_value", type=int, default=42, show_default=True, help="Generator's random seed."
)
@click.option("--database-url", help="Database to use (default: SQLite file demo/demo.db).")
@click.option("--broker-url", help="Broker for real workers (default: embedded, in-process).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="demo",
    show_default=True,
    help="Where the demo writes its alembic.ini, SQLite file and worker logs.",
)
@click.option("--batch-size", type=int, help="Parents per backfill batch (default: users/50).")
@click.option(
    "--workers",
    type=int,
    default=2,
    show_default=True,
    help="Worker processes to start with --broker-url.",
)
def demo(
    users: int,
    seed_value: int,
    database_url: str | None,
    broker_url: str | None,
    workdir: str,
    batch_size: int | None,
    workers: int,
) -> None:
    """Migrate, load stale data, add counters, backfill with --wait --verify, compare reads."""
    from .demo import Demo

    with reported():
        code = Demo(
            users=users,
            seed=seed_value,
            database_url=database_url,
            broker_url=broker_url,
            workdir=Path(workdir),
            batch_size=batch_size,
            workers=workers,
        ).run()
    sys.exit(code)


if __name__ == "__main__":
    main(prog_name="python -m example_project")
