"""Alembic environment of the example app, with the alembic_counterfill plugin enabled."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool

from example_project.models import Base

config = context.config

if config.config_file_name is not None and config.file_config.has_section("loggers"):
    # Keep loggers created before this point (the counterfill CLI's) working.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

# The plugin teaches autogenerate to add op.request_counter_backfill() next to
# each new counter_cache() column, and to leave the library's own tables alone.
PLUGINS = ["alembic.autogenerate.*", "alembic_counterfill"]


def run_migrations_offline() -> None:
    """Render the migrations as SQL (``alembic upgrade --sql``) without a database."""
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        autogenerate_plugins=PLUGINS,
        render_as_batch=bool(url and url.startswith("sqlite")),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a connection to ``sqlalchemy.url``."""
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            autogenerate_plugins=PLUGINS,
            # SQLite alters tables by copying them; batch mode does that for us.
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
