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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dramatiq
import sqlalchemy as sa
from dramatiq.middleware import Middleware, Retries

from .counters import Counter
from .errors import BrokerError, ConfigurationError, DefinitionMismatch
from .urls import redact

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

#: The fold actor's name: a message ``counterfill_fold()`` folds every buffered counter's deltas.
FOLD_ACTOR = "counterfill_fold"

#: Milliseconds between a worker's checks for deltas waiting to be folded.
FOLD_INTERVAL_MS = 250

#: Longest pause between polls of an idle Redis queue by a worker.
IDLE_POLL_MS = 100

#: Delay before a paused batch's message is looked at again.
PAUSED_RECHECK_MS = 5_000

#: Delay before a batch that gave way to database signals is tried again.
THROTTLED_RECHECK_MS = 1_000


def describe(exc: BaseException) -> str:
    """:func:`.batch.describe`, imported on first use (``enqueue`` sends but runs no batch)."""
    from .batch import describe as describe_error

    return describe_error(exc)


def _namespace(url: str) -> tuple[str, str]:
    """Split the library's own ``?namespace=`` parameter off a Redis URL (redis-py rejects it)."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    namespace = next((v for k, v in pairs if k == "namespace"), "dramatiq")
    rest = urlencode([(k, v) for k, v in pairs if k != "namespace"])
    return urlunsplit(parts._replace(query=rest)), namespace or "dramatiq"


def _check_url(url: str) -> str:
    """The URL's scheme; ConfigurationError when the URL (host, port) cannot be parsed."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ConfigurationError(
            f"broker_url {redact(url)!r} is malformed ({exc}); write e.g. "
            "redis://:password@host:6379/0 or amqp://user:password@host:5672/"
        ) from None
    return parts.scheme if "://" in url else ""


def broker_from_url(url: str, *, sending: bool = False) -> dramatiq.Broker:
    """A Dramatiq broker for ``redis://``, ``rediss://`` or ``amqp://`` (RabbitMQ) URLs.

    :param sending: the broker only sends (``enqueue``): fail fast when the
        server is unreachable and, on RabbitMQ, wait for publisher confirms.
    """
    scheme = _check_url(url)
    if scheme in ("redis", "rediss"):
        try:
            import redis
            from dramatiq.brokers.redis import RedisBroker
        except ImportError as exc:
            raise _missing_extra(url, "redis", exc) from None

        # ``?namespace=name`` prefixes every Dramatiq key, so that several apps
        # (or test runs) share one Redis database without touching each other.
        url, namespace = _namespace(url)
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=5 if sending else None)
        except ValueError as exc:
            raise ConfigurationError(
                f"broker_url {redact(url)!r} is not a valid Redis URL ({exc}); "
                "write e.g. redis://:password@host:6379/0"
            ) from None
        if sending:
            return RedisBroker(client=client, namespace=namespace)

        class _Broker(RedisBroker):
            def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
                # An idle Redis consumer backs off to the worker timeout (1 s)
                # between polls, which a freshly enqueued backfill waits out;
                # polling every IDLE_POLL_MS costs Redis next to nothing.
                return super().consume(queue_name, prefetch, min(timeout, IDLE_POLL_MS))

        return _Broker(client=client, namespace=namespace)
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
        from .batch import mark_failed, note_retry

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
            try:  # `enqueue --wait` and `status` show retries as they happen
                note_retry(self.source.engine(), batch_id, error)
            except Exception as exc:
                log.warning("could not record the retry of batch %s: %s", batch_id, exc)
            return
        try:
            mark_failed(self.source.engine(), batch_id, error)
        except Exception as exc:  # the database may be what failed; the log keeps the error
            log.error("batch %s failed: %s (could not record it: %s)", batch_id, error, exc)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        from .heartbeat import Heartbeat

        try:
            self.heartbeat = Heartbeat(self.source.engine(), self.source.settings.queue).start()
        except Exception as exc:  # no heartbeat only makes `status` unsure, never stops batches
            log.warning("worker heartbeat disabled: %s", exc)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        heartbeat = getattr(self, "heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop()
        self.source.dispose()


class _FoldTicker(Middleware):
    """Sends ``counterfill_fold`` while buffered counters have deltas older than the interval.

    One daemon thread per worker process, started at worker boot, reading
    one cheap aggregate per deltas table each interval; with no buffered
    counter declared it stops at once. Several processes may send a fold for
    the same deltas: folds racing each other stay exact.
    """

    def __init__(self, source: Source, actor: dramatiq.Actor[Any, Any], interval_ms: int) -> None:
        self.source = source
        self.actor = actor
        self.interval = interval_ms / 1000
        self.stop = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        threading.Thread(target=self._tick, name="counterfill-fold-ticker", daemon=True).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.stop.set()

    def _tick(self) -> None:
        from .fold import parent_tables, pending

        last_sent = 0.0
        while not self.stop.wait(self.interval):
            try:
                tables = parent_tables(self.source.counters().values())
                if not tables:
                    return
                with self.source.engine().connect() as conn:
                    ages = [pending(conn, t).oldest_seconds for t in tables]
                now = time.monotonic()
                due = any(a is not None and a >= self.interval for a in ages)
                # A fold already sent is given a few intervals to run before another.
                if due and now - last_sent >= 4 * self.interval:
                    self.actor.send()
                    last_sent = now
            except Exception as exc:  # the database or broker may be down: keep ticking
                log.warning("fold ticker: %s", describe(exc))
                self.stop.wait(10 * self.interval)


@dataclass
class BackfillActors:
    """The actors declared on one broker, and what they run against."""

    broker: dramatiq.Broker
    batch: dramatiq.Actor[Any, Any]
    source: Source
    fold: dramatiq.Actor[Any, Any] | None = None

    def send(self, batch_ids: Iterable[int]) -> int:
        """Send one message per batch id to this actor's queue; return how many were sent."""
        return send_batches(self.broker, self.batch.queue_name, batch_ids)


def _message(queue: str, batch_id: int) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=queue, actor_name=BATCH_ACTOR, args=(batch_id,), kwargs={}, options={}
    )


def queued_batch_ids(broker: dramatiq.Broker, queue: str) -> set[int] | None:
    """Batch ids whose messages wait in ``queue`` (delayed ones too), if the broker can tell.

    Redis keeps waiting message ids in a list per queue and their bodies in a
    hash; a message a worker took (and perhaps lost by dying) is in neither
    list, so it counts as not queued. RabbitMQ cannot list its messages:
    ``None``, and ``enqueue`` re-sends every unfinished batch.
    """
    client = getattr(broker, "client", None)
    namespace = getattr(broker, "namespace", None)
    if client is None or namespace is None:
        return None
    found: set[int] = set()
    for name in (queue, f"{queue}.DQ"):
        key = f"{namespace}:{name}"
        ids = client.lrange(key, 0, -1)
        if not ids:
            continue
        for body in client.hmget(f"{key}.msgs", ids):
            if body is None:
                continue
            try:
                message = dramatiq.Message.decode(body)
            except Exception:  # not ours to judge; the worker will reject it
                continue
            if message.actor_name == BATCH_ACTOR and message.args:
                found.add(int(message.args[0]))
    return found


def queue_ready_count(broker: dramatiq.Broker, queue: str) -> int | None:
    """Messages ready in ``queue`` and its delay queue on RabbitMQ (None: unknown).

    Messages a worker holds (unacknowledged, or delayed in its memory) are not
    counted: RabbitMQ returns them to the queue only if that worker dies.
    """
    counts = getattr(broker, "get_queue_message_counts", None)
    if counts is None:
        return None
    try:
        ready, delayed, _ = counts(queue)
    except Exception as exc:  # unknown is safe: resend.py then relies on age alone
        log.warning("cannot count the messages of queue %s: %s", queue, describe(exc))
        return None
    return int(ready) + int(delayed)


def _note_sent(source: Source, batch_id: int) -> None:
    """Stamp a worker's re-send of a batch, so ``enqueue`` knows its message is fresh."""
    from .resend import note_sent

    try:
        with source.engine().begin() as conn:
            note_sent(conn, [batch_id])
    except Exception as exc:  # only makes a later `enqueue` re-send it sooner
        log.warning("could not record the re-send of batch %s: %s", batch_id, describe(exc))


def send_batches(broker: dramatiq.Broker, queue: str, batch_ids: Iterable[int]) -> int:
    """Send one ``counterfill_batch(batch_id)`` message per id; return how many were sent.

    Needs no declared actor, so ``enqueue`` can send without importing the
    workers' setup. Raises :class:`~.errors.BrokerError` if the broker fails.
    """
    sent = 0
    try:
        broker.declare_queue(queue)
        for batch_id in batch_ids:
            broker.enqueue(_message(queue, batch_id))
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
    fold_interval: int = FOLD_INTERVAL_MS,
) -> BackfillActors:
    """Declare the backfill and fold actors on ``broker`` (one call from an app's tasks module).

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
    :param fold_interval: milliseconds between each worker process's checks
        for deltas of buffered counters waiting to be folded.
    """
    from .batch import BatchNotFound, mark_refused, run_batch

    if settings is None:
        from .config import load

        settings = load()
    source = Source(settings)

    def counterfill_batch(batch_id: int) -> None:
        try:
            outcome = run_batch(
                source.engine(),
                source.counters(),
                batch_id,
                statement_timeout_ms=time_limit,
                pacing=settings.pacing,
                throttle=settings.throttle,
                # Half the time limit: a long range yields and is sent again rather
                # than being killed by the time limit mid-transaction.
                budget_seconds=time_limit / 2000,
            )
        except DefinitionMismatch as exc:
            # Rolling deploy: this worker's models differ from the planner's.
            # Not a failure and not a retry: send the batch again later, for
            # whichever worker runs the matching models, backing off each time.
            refusals = mark_refused(source.engine(), batch_id, describe(exc))
            delay = min(max_backoff, min_backoff * 2 ** min(max(refusals - 1, 0), 16))
            broker.enqueue(_message(settings.queue, batch_id), delay=delay)
            _note_sent(source, batch_id)
            return
        if outcome.yielded is not None:
            # Not done: paused, throttled or out of time. Leave it queued for
            # later; its cursor in the database says where to continue.
            delay = (
                PAUSED_RECHECK_MS
                if outcome.yielded == "paused"
                else THROTTLED_RECHECK_MS
                if outcome.yielded.startswith("throttled")
                else None
            )
            broker.enqueue(_message(settings.queue, batch_id), delay=delay)
            _note_sent(source, batch_id)

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

    def counterfill_fold() -> None:
        from .fold import fold

        fold(source.engine(), source.counters().values())

    folder: dramatiq.Actor[Any, Any] = dramatiq.actor(
        actor_name=FOLD_ACTOR,
        queue_name=settings.queue,
        broker=broker,
        max_retries=0,  # the ticker sends another while deltas wait
        time_limit=time_limit,
    )(counterfill_fold)
    broker.add_middleware(_FoldTicker(source, folder, fold_interval))
    return BackfillActors(broker, actor, source, folder)
