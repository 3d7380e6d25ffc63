"""Dramatiq glue: brokers from URLs, the batch actor declared on a broker passed in, sending.

Nothing here is bound to a broker at import time. Workers started with
``dramatiq alembic_counterfill.worker`` get everything from the alembic
config; an app with its own Dramatiq setup adds one line to its tasks module::

    from alembic_counterfill.actors import declare_actors

    declare_actors(broker)  # settings from alembic.ini / ALEMBIC_CONFIG
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import sqlalchemy as sa
from dramatiq.middleware import Middleware, Retries

from .batch import BatchNotFound, describe, mark_failed, run_batch
from .counters import Counter
from .errors import BrokerError, ConfigurationError

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("alembic_counterfill.actors")

#: The batch actor's name: a message ``counterfill_batch(batch_id)`` runs one batch.
BATCH_ACTOR = "counterfill_batch"

#: Defaults: a few retries with backoff from 1 s, and 5 minutes per batch.
MAX_RETRIES = 5
MIN_BACKOFF_MS = 1_000
MAX_BACKOFF_MS = 60_000
TIME_LIMIT_MS = 300_000

#: Longest pause between polls of an idle Redis queue by a worker.
IDLE_POLL_MS = 100


def redact(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def broker_from_url(url: str, *, sending: bool = False) -> dramatiq.Broker:
    """A Dramatiq broker for ``redis://``, ``rediss://`` or ``amqp://`` (RabbitMQ) URLs.

    :param sending: the broker only sends (``enqueue``): fail fast when the
        server is unreachable and, on RabbitMQ, wait for publisher confirms.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        try:
            import redis
            from dramatiq.brokers.redis import RedisBroker
        except ImportError as exc:
            raise _missing_extra(url, "redis", exc) from None

        if sending:
            return RedisBroker(client=redis.Redis.from_url(url, socket_connect_timeout=5))

        class _Broker(RedisBroker):
            def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
                # An idle Redis consumer backs off to the worker timeout (1 s)
                # between polls, which a freshly enqueued backfill waits out;
                # polling every IDLE_POLL_MS costs Redis next to nothing.
                return super().consume(queue_name, prefetch, min(timeout, IDLE_POLL_MS))

        return _Broker(url=url)
    if scheme in ("amqp", "amqps"):
        try:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker
        except ImportError as exc:
            raise _missing_extra(url, "rabbitmq", exc) from None

        return RabbitmqBroker(url=url, confirm_delivery=sending)
    raise ConfigurationError(
        f"broker_url {redact(url)!r} has unsupported scheme {scheme!r}; "
        "use redis://, rediss:// or amqp:// (or leave broker_url out to run batches in-process)"
    )


def _missing_extra(url: str, extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"broker_url {redact(url)!r} needs the {extra} client ({exc}); "
        f"install it with pip install 'alembic_counterfill[{extra}]'"
    )


def ping(broker: dramatiq.Broker, url: str) -> None:
    """Raise :class:`~.errors.BrokerError` unless the broker's server answers."""
    try:
        client = getattr(broker, "client", None)
        if client is not None:
            client.ping()
        else:
            _ = broker.connection  # type: ignore[attr-defined]  # RabbitMQ: opens a connection
    except Exception as exc:
        raise BrokerError(
            f"cannot reach the broker at {redact(url)} ({describe(exc)}); "
            "start it, or fix broker_url / COUNTERFILL_BROKER_URL"
        ) from exc


class Source:
    """Where batches run: the database engine and the declared counters, made once per process.

    The engine is created on first use in each process (so a worker forked
    after import never shares connections with its parent) and disposed at
    worker shutdown.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._engine: sa.Engine | None = None
        self._pid = 0
        self._counters: dict[str, Counter] | None = None

    def engine(self) -> sa.Engine:
        """This process's engine, created on first use."""
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                url = sa.make_url(self.settings.database_url)
                args: dict[str, Any] = {}
                if url.get_backend_name() == "postgresql":
                    args["connect_args"] = {"application_name": "counterfill-worker"}
                self._engine = sa.create_engine(url, pool_pre_ping=True, **args)
                self._pid = os.getpid()
            return self._engine

    def counters(self) -> dict[str, Counter]:
        """Declared counters by key (imports the models on first use)."""
        with self._lock:
            if self._counters is None:
                self._counters = {c.key: c for c in self.settings.counters()}
            return self._counters

    def dispose(self) -> None:
        """Close this process's connections."""
        with self._lock:
            if self._engine is not None and self._pid == os.getpid():
                self._engine.dispose()
            self._engine = None


class _BatchLifecycle(Middleware):
    """Marks a batch failed once Dramatiq gives up on it; disposes the engine at shutdown."""

    def __init__(self, source: Source, actor_name: str) -> None:
        self.source = source
        self.actor_name = actor_name

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or message.actor_name != self.actor_name:
            return
        if not message.args:
            return
        batch_id = message.args[0]
        error = describe(exception)
        if not message.failed:  # Retries re-enqueued it with backoff
            log.warning(
                "batch %s attempt %d failed, will retry: %s",
                batch_id,
                message.options.get("retries", 0),
                error,
            )
            return
        try:
            mark_failed(self.source.engine(), batch_id, error)
        except Exception as exc:  # the database may be what failed; the log keeps the error
            log.error("batch %s failed: %s (could not record it: %s)", batch_id, error, exc)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.source.dispose()


@dataclass
class BackfillActors:
    """The actors declared on one broker, and what they run against."""

    broker: dramatiq.Broker
    batch: dramatiq.Actor[Any, Any]
    source: Source

    def send(self, batch_ids: Iterable[int]) -> int:
        """Send one message per batch id to this actor's queue; return how many were sent."""
        return send_batches(self.broker, self.batch.queue_name, batch_ids)


def send_batches(broker: dramatiq.Broker, queue: str, batch_ids: Iterable[int]) -> int:
    """Send one ``counterfill_batch(batch_id)`` message per id; return how many were sent.

    Needs no declared actor, so ``enqueue`` can send without importing the
    workers' setup. Raises :class:`~.errors.BrokerError` if the broker fails.
    """
    sent = 0
    try:
        broker.declare_queue(queue)
        for batch_id in batch_ids:
            broker.enqueue(
                dramatiq.Message(
                    queue_name=queue,
                    actor_name=BATCH_ACTOR,
                    args=(batch_id,),
                    kwargs={},
                    options={},
                )
            )
            sent += 1
    except Exception as exc:
        raise BrokerError(
            f"the broker failed after {sent} messages ({describe(exc)}); "
            "the plan is saved: run `enqueue` again once the broker is back"
        ) from exc
    return sent


def declare_actors(
    broker: dramatiq.Broker,
    settings: Settings | None = None,
    *,
    max_retries: int = MAX_RETRIES,
    min_backoff: int = MIN_BACKOFF_MS,
    max_backoff: int = MAX_BACKOFF_MS,
    time_limit: int = TIME_LIMIT_MS,
) -> BackfillActors:
    """Declare the backfill actor on ``broker`` (one call from an app's tasks module).

    :param broker: the app's broker; it needs Dramatiq's default ``Retries``
        and ``TimeLimit`` middleware.
    :param settings: database, models and queue; read from the alembic
        config (``ALEMBIC_CONFIG`` or ./alembic.ini) when omitted. Models and
        the database are touched only when the first batch runs.
    :param max_retries: retries of a failing batch before it is marked failed.
    :param min_backoff: first retry delay in milliseconds (doubles each time).
    :param max_backoff: longest retry delay in milliseconds.
    :param time_limit: milliseconds a batch may run; also its PostgreSQL
        ``statement_timeout``.
    """
    if settings is None:
        from .config import load

        settings = load()
    source = Source(settings)

    def counterfill_batch(batch_id: int) -> None:
        run_batch(source.engine(), source.counters(), batch_id, statement_timeout_ms=time_limit)

    actor: dramatiq.Actor[Any, Any] = dramatiq.actor(
        actor_name=BATCH_ACTOR,
        queue_name=settings.queue,
        broker=broker,
        max_retries=max_retries,
        min_backoff=min_backoff,
        max_backoff=max_backoff,
        time_limit=time_limit,
        throws=(ConfigurationError, BatchNotFound),  # retrying cannot help these
    )(counterfill_batch)
    lifecycle = _BatchLifecycle(source, BATCH_ACTOR)
    if any(isinstance(m, Retries) for m in broker.middleware):
        # "after" hooks run in reverse list order: placed before Retries, ours
        # runs after it and sees the message.failed it sets.
        broker.add_middleware(lifecycle, before=Retries)
    else:
        broker.add_middleware(lifecycle)
    return BackfillActors(broker, actor, source)
