"""Entry module for ``dramatiq alembic_counterfill.worker``: broker and actors from alembic config.

Run it where alembic.ini is (or with ``ALEMBIC_CONFIG`` set)::

    dramatiq alembic_counterfill.worker --processes 2 --threads 2

Importing this module is what configures the worker process: it reads the
``[counterfill]`` settings, builds the broker from ``broker_url`` (or
``COUNTERFILL_BROKER_URL``), makes it Dramatiq's global broker and declares
the batch actor on it. The database engine is created lazily in each worker
process and disposed when the worker shuts down.

Retries and the time limit can be tuned with ``COUNTERFILL_MAX_RETRIES``,
``COUNTERFILL_MIN_BACKOFF``, ``COUNTERFILL_MAX_BACKOFF`` and
``COUNTERFILL_TIME_LIMIT`` (milliseconds); buffered counters' fold checks with
``COUNTERFILL_FOLD_INTERVAL`` (milliseconds, default 250).
"""

from __future__ import annotations

import logging
import os
import sys

import dramatiq

from . import actors as _actors
from .actors import BackfillActors, broker_from_url, declare_actors
from .config import BROKER_ENV, load
from .errors import ConfigurationError, CounterfillError

#: Environment variables tuning the batch actor (milliseconds for times).
TUNING = {
    "COUNTERFILL_MAX_RETRIES": ("max_retries", _actors.MAX_RETRIES),
    "COUNTERFILL_MIN_BACKOFF": ("min_backoff", _actors.MIN_BACKOFF_MS),
    "COUNTERFILL_MAX_BACKOFF": ("max_backoff", _actors.MAX_BACKOFF_MS),
    "COUNTERFILL_TIME_LIMIT": ("time_limit", _actors.TIME_LIMIT_MS),
    "COUNTERFILL_FOLD_INTERVAL": ("fold_interval", _actors.FOLD_INTERVAL_MS),
}


def _tuning() -> dict[str, int]:
    options = {}
    for env, (option, default) in TUNING.items():
        raw = os.environ.get(env, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            value = -1
        if value < 0 or (value == 0 and option in ("time_limit", "fold_interval")):
            raise ConfigurationError(f"{env}={raw!r} is not a valid number; give e.g. {default}")
        options[option] = value
    return options


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
    return declare_actors(broker, settings, **_tuning())


# Alembic logs each plugin it sets up at INFO, and Dramatiq shows INFO from
# every worker process: noise in a worker's log, not news.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

try:
    actors = _configure()
except CounterfillError as exc:
    # One line, not Dramatiq's "failed to import module" traceback (dozens of
    # lines for a missing config file); exit status 2 like Dramatiq's import errors.
    sys.stderr.write(f"alembic_counterfill.worker: {exc}\n")
    sys.stderr.flush()
    raise SystemExit(2) from None

broker = actors.broker
