"""Entry module for ``dramatiq alembic_counterfill.worker``: broker and actors from alembic config.

Run it where alembic.ini is (or with ``ALEMBIC_CONFIG`` set)::

    dramatiq alembic_counterfill.worker --processes 2 --threads 2

Importing this module is what configures the worker process: it reads the
``[counterfill]`` settings, builds the broker from ``broker_url`` (or
``COUNTERFILL_BROKER_URL``), makes it Dramatiq's global broker and declares
the batch actor on it. The database engine is created lazily in each worker
process and disposed when the worker shuts down.
"""

from __future__ import annotations

import dramatiq

from .actors import BackfillActors, broker_from_url, declare_actors
from .config import BROKER_ENV, load
from .errors import ConfigurationError, CounterfillError


def _configure() -> BackfillActors:
    settings = load()
    if not settings.broker_url:
        raise ConfigurationError(
            f"workers need a broker: set broker_url in [counterfill] of "
            f"{settings.config_file or 'alembic.ini'} or {BROKER_ENV} "
            "(without one, `enqueue` runs batches in-process and needs no worker)"
        )
    broker = broker_from_url(settings.broker_url)
    dramatiq.set_broker(broker)
    return declare_actors(broker, settings)


try:
    actors = _configure()
except CounterfillError as exc:
    # Dramatiq reports ImportError as "failed to import module" and exits 2.
    raise ImportError(f"alembic_counterfill.worker: {exc}") from exc

broker = actors.broker
