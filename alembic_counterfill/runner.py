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

from .batch import BatchOutcome, describe, mark_failed, mark_refused, run_batch
from .counters import Counter
from .errors import ConfigurationError, DefinitionMismatch

log = logging.getLogger("alembic_counterfill.runner")


def run_inline(
    engine: sa.Engine,
    counters: Mapping[str, Counter],
    batch_ids: Sequence[int],
    *,
    attempts: int = 3,
    backoff: float = 0.5,
    on_batch: Callable[[BatchOutcome | None], None] | None = None,
) -> list[BatchOutcome]:
    """Run ``batch_ids`` here, in order; return the outcome of each batch that ran.

    :param attempts: tries per batch before it is marked failed.
    :param backoff: seconds before the first retry (doubles each time).
    :param on_batch: called after each batch with its outcome (``None`` when
        it was marked failed, or refused because it was planned under other
        counter definitions), e.g. to draw a progress bar.
    """
    outcomes: list[BatchOutcome] = []
    for batch_id in batch_ids:
        outcome = _run_one(engine, counters, batch_id, attempts, backoff)
        if outcome is not None:
            outcomes.append(outcome)
        if on_batch is not None:
            on_batch(outcome)
    return outcomes


def _run_one(
    engine: sa.Engine,
    counters: Mapping[str, Counter],
    batch_id: int,
    attempts: int,
    backoff: float,
) -> BatchOutcome | None:
    for attempt in range(1, attempts + 1):
        try:
            return run_batch(engine, counters, batch_id)
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
            time.sleep(backoff * 2 ** (attempt - 1))
    return None
