"""Run batches in this process: the embedded default (no ``broker_url``) and ``enqueue --inline``.

Plain function calls, one batch after another, through the same
:func:`~.batch.run_batch` the Dramatiq actor calls, so the protocol and the
bookkeeping are identical; a failing batch is retried with backoff, then
marked failed like a worker would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import sqlalchemy as sa

from .batch import BatchOutcome, describe, mark_failed, mark_refused, note_retry, run_batch
from .counters import Counter
from .errors import ConfigurationError, DefinitionMismatch
from .pacing import Pacing
from .signals import Throttle

log = logging.getLogger("alembic_counterfill.runner")


def run_inline(
    engine: sa.Engine,
    counters: Mapping[str, Counter],
    batch_ids: Sequence[int],
    *,
    attempts: int = 3,
    backoff: float = 0.5,
    on_batch: Callable[[BatchOutcome | None], None] | None = None,
    pacing: Pacing | None = None,
    throttle: Throttle | None = None,
) -> list[BatchOutcome]:
    """Run ``batch_ids`` here, in order; return the outcome of each batch that ran.

    Stops early, leaving the rest for later, when a batch reports its run paused.

    :param attempts: tries per batch before it is marked failed.
    :param backoff: seconds before the first retry (doubles each time).
    :param on_batch: called after each batch with its outcome (``None`` when
        it was marked failed), e.g. to draw a progress bar.
    :param pacing: target duration and bounds of adaptive transactions.
    :param throttle: database signals to back off on.
    """
    outcomes: list[BatchOutcome] = []
    for batch_id in batch_ids:
        outcome = _run_one(engine, counters, batch_id, attempts, backoff, pacing, throttle)
        if outcome is not None:
            outcomes.append(outcome)
        if on_batch is not None:
            on_batch(outcome)
        if outcome is not None and outcome.yielded == "paused":
            break
    return outcomes


def _run_one(
    engine: sa.Engine,
    counters: Mapping[str, Counter],
    batch_id: int,
    attempts: int,
    backoff: float,
    pacing: Pacing | None,
    throttle: Throttle | None,
) -> BatchOutcome | None:
    for attempt in range(1, attempts + 1):
        try:
            return run_batch(engine, counters, batch_id, pacing=pacing, throttle=throttle)
        except DefinitionMismatch as exc:
            # Planned by other models: leave it (not failed) for a process running them.
            mark_refused(engine, batch_id, describe(exc))
            return None
        except ConfigurationError as exc:  # retrying cannot help
            mark_failed(engine, batch_id, describe(exc))
            return None
        except Exception as exc:
            if attempt == attempts:
                mark_failed(engine, batch_id, describe(exc))
                return None
            log.warning("batch %d attempt %d failed, will retry: %s", batch_id, attempt, exc)
            note_retry(engine, batch_id, describe(exc))
            time.sleep(backoff * 2 ** (attempt - 1))
    return None
