"""``enqueue`` and ``verify``: the backfill commands of the ``counterfill`` click group.

Thin by design: planning, batches, monitoring and verification live in their
own modules; this one turns options into calls and results into output.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
import sqlalchemy as sa

from . import definition, monitor, notify, pacing, planning, resend
from . import progress as p
from .counters import Counter, select_counters
from .errors import CounterfillError, UnknownCounterError
from .text import render_table

if TYPE_CHECKING:
    from .config import Settings

#: ``ctx.meta`` key where the group keeps the command prefix for hints (see cli.py).
PREFIX_KEY = "alembic_counterfill.prefix"


def chosen_counters(
    settings: Settings, names: Sequence[str]
) -> tuple[list[Counter], list[Counter]]:
    """(declared, named) counters, every declared one if none is named.

    An unknown name is a usage error (exit 2) naming it.
    """
    declared = settings.counters()
    try:
        return declared, (select_counters(declared, names) if names else declared)
    except UnknownCounterError as exc:
        raise click.BadParameter(str(exc), param_hint="COUNTER") from None


def hint(command: str) -> str:
    """``command`` prefixed the way the user started this one (``alembic -c pg.ini …``)."""
    prefix = click.get_current_context().meta.get(PREFIX_KEY, "alembic counterfill")
    return f"{prefix} {command}"


#: Seconds between two reads of the progress by ``--wait``: polling where the
#: database cannot notify, and with notifications only to redraw the bar and
#: notice a pause (a run's end wakes the loop at once). A poll is two short
#: reads; at 0.1 s the end of a run was noticed 0.05 s late on average, a
#: visible share of a one-second backfill (MariaDB, docs/performance.md).
WAIT_INTERVAL = 0.05
WAIT_INTERVAL_NOTIFIED = 0.5

#: Messages sent between two records of what was sent (a Ctrl-C loses at most this much).
SEND_CHUNK = 500


@click.command("enqueue")
@click.argument("counters", nargs=-1, metavar="[COUNTER]...")
@click.option(
    "--all", "everything", is_flag=True, help="Every declared counter, active ones included."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    envvar="COUNTERFILL_BATCH_SIZE",
    show_envvar=True,
    default=None,
    help="Pin every batch transaction to N parents (default: adaptive, up to [counterfill] "
    "batch_size or 10000 per planned range).",
)
@click.option(
    "--max-rows-per-second",
    type=click.FloatRange(min=0, min_open=True),
    envvar="COUNTERFILL_MAX_ROWS_PER_SECOND",
    show_envvar=True,
    default=None,
    help="Rate limit of the backfill, in parents per second, over all workers.",
)
@click.option(
    "--wait",
    is_flag=True,
    envvar="COUNTERFILL_WAIT",
    show_envvar=True,
    help="Show progress until done, then a summary.",
)
@click.option(
    "--verify",
    "check",
    is_flag=True,
    envvar="COUNTERFILL_VERIFY",
    show_envvar=True,
    help="After --wait, verify (implies --wait).",
)
@click.option("--inline", is_flag=True, help="Run the batches in this process, with no broker.")
@click.pass_obj
def enqueue(
    settings: Settings,
    counters: tuple[str, ...],
    everything: bool,
    batch_size: int | None,
    max_rows_per_second: float | None,
    wait: bool,
    check: bool,
    inline: bool,
) -> None:
    """Plan and send backfills for counters that are not active (or the COUNTERs named).

    Re-running resumes: only batches that are not done and whose messages are
    not still queued are sent again. Without a broker_url (or with --inline)
    the batches run here, one after another.
    """
    try:
        planning.check_choice(counters, everything)
    except CounterfillError as exc:  # exit 2: the arguments are wrong
        raise click.UsageError(str(exc)) from None
    declared, named = chosen_counters(settings, counters)
    engine = settings.engine()
    _require_columns(engine, named if counters else declared)
    in_process = inline or not settings.broker_url
    planning_started = time.monotonic()
    broker = None
    if not in_process:
        # Dramatiq is imported only when sending: status, verify and in-process
        # runs start faster without it.
        from .actors import broker_from_url, ping

        assert settings.broker_url is not None
        broker = broker_from_url(settings.broker_url, sending=True)
    sizing = planning.Sizing(
        pinned=batch_size is not None,
        start=min(pacing.START_SIZE, settings.batch_size),
        max_rows_per_second=max_rows_per_second or settings.max_rows_per_second,
    )
    try:
        if broker is not None and settings.broker_url:
            ping(broker, settings.broker_url)  # before planning: a dead broker changes nothing
        with engine.begin() as conn:
            chosen = named if counters else planning.choose(conn, declared, (), everything)
            if not chosen:
                click.echo(
                    "nothing to backfill: no counter is pending (name counters, e.g. unknown "
                    "ones, or use --all to recount)"
                )
                return
            plan = planning.plan(
                conn, chosen, batch_size or settings.batch_size, sizing, declared=declared
            )
        _describe_plan(engine, plan, batch_size)
        if broker is not None and settings.broker_url:
            _send(settings, broker, engine, plan, planning_started)
    finally:
        if broker is not None:
            broker.close()
    started = time.monotonic()
    if in_process:
        _run_here(settings, plan, show=wait or check)
    elif wait or check:
        try:
            # Listening before the first read of the progress: a run that
            # ends after that read wakes the loop at once (no lost wake-up).
            with notify.Listener(engine) as listener:
                interval = WAIT_INTERVAL_NOTIFIED if listener.listening else WAIT_INTERVAL
                monitor.wait(
                    engine, plan.run_ids, stream=sys.stderr, interval=interval, sleep=listener.wait
                )
        except KeyboardInterrupt:
            click.echo(
                "\nstopped watching; the workers carry on. Follow with: " + hint("status --watch"),
                err=True,
            )
            return
    else:
        click.echo(f"follow with: {hint('status --watch')}")
        return
    with engine.connect() as conn:
        lines = monitor.summary(conn, plan.run_ids, time.monotonic() - started)
        pr = monitor.read_progress(conn, plan.run_ids)
    for line in lines:
        click.echo(line)
    if pr.paused and not pr.finished:
        raise CounterfillError(
            f"the backfill is paused ({pr.remaining} batches left); "
            f"continue it with `{hint('resume')}`"
        )
    if pr.batches_failed:
        raise CounterfillError(
            f"{pr.batches_failed} batches failed (errors above and in `status`); fix the cause, "
            f"then run `{hint('enqueue')}` again to retry them"
        )
    if check:
        keys = {k for run in _run_keys(engine, plan.run_ids) for k in run}
        _report_drift(settings, [c for c in declared if c.key in keys], fix=False, as_json=False)


def _require_columns(engine: Any, counters: Sequence[Counter]) -> None:
    """Refuse to work on counters whose column the database lacks (migration not run).

    Bookkeeping tables an older release created get the columns this one needs first.
    """
    p.upgrade_tables(engine)
    with engine.connect() as conn:
        missing = p.missing_columns(conn, counters)
    if missing:
        raise CounterfillError(
            f"{', '.join(missing)}: the column is not in the database; run "
            "`alembic upgrade head` first (or check sqlalchemy.url)"
        )


def _send(
    settings: Settings,
    broker: Any,
    engine: Any,
    plan: planning.BackfillPlan,
    planning_started: float,
) -> None:
    """Send the plan's batches (not those still queued), recording what was sent as it goes.

    A Ctrl-C while sending records the messages already sent and says how to
    send the rest; nothing is sent twice by the next ``enqueue``.
    """
    from .actors import queue_ready_count, queued_batch_ids, redact, send_batches

    assert settings.broker_url is not None
    queued = queued_batch_ids(broker, settings.queue)
    if queued is not None:
        to_send = [i for i in plan.batch_ids if i not in queued]
    else:  # RabbitMQ: the bookkeeping says what is still queued (resend.py)
        ready = queue_ready_count(broker, settings.queue)
        with engine.connect() as conn:
            drained = ready == 0 and p.alive_workers(conn, settings.queue) == 0
            to_send = resend.to_send(
                conn, plan.batch_ids, settings.resend_after_seconds, queue_drained=drained
            )
    skipped = len(plan.batch_ids) - len(to_send)
    sent = 0
    try:
        for start in range(0, len(to_send), SEND_CHUNK):
            chunk = to_send[start : start + SEND_CHUNK]
            # Recorded before the messages go out: once they have, a worker
            # may hold a batch's row, and this update would wait for its
            # transaction (and the worker would back off for this waiter).
            # Messages that did go out are not sent again; a batch marked sent
            # whose message did not go out (Ctrl-C mid-chunk) is re-sent by
            # the next `enqueue` (docs/backfilling.md, "Re-sending").
            with engine.begin() as conn:
                resend.note_sent(conn, chunk)
            send_batches(broker, settings.queue, chunk)
            sent += len(chunk)
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: sent {sent} of {len(to_send)} batches; the plan is saved. "
            f"Send the rest with: {hint('enqueue')}",
            err=True,
        )
        raise click.exceptions.Exit(130) from None
    note = f", {skipped} still queued from before" if skipped else ""
    click.echo(
        f"sent {sent} batches to queue {settings.queue!r} on "
        f"{redact(settings.broker_url)}{note} "
        f"(planned and sent in {time.monotonic() - planning_started:.2f}s)"
    )


def _run_keys(engine: Any, run_ids: list[int]) -> list[list[str]]:
    r = p.runs_table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(r.c.counter_keys).where(r.c.id.in_(run_ids))).scalars()
        return [keys.split(",") for keys in rows]


def _describe_plan(engine: Any, plan: planning.BackfillPlan, batch_size: int | None) -> None:
    r = p.runs_table
    with engine.connect() as conn:
        runs = conn.execute(sa.select(r).where(r.c.id.in_(plan.run_ids)).order_by(r.c.id))
        for run in runs.mappings():
            resumed = run["id"] in plan.resumed_run_ids
            left = run["batches_total"] - run["batches_done"]
            if run["pinned"]:
                size = f"{run['chunk_size'] or run['batch_size']:,} parents per transaction"
            else:
                size = f"adaptive size up to {run['batch_size']:,} parents"
            click.echo(
                f"{'resuming' if resumed else 'planned'} run {run['id']} on {run['table_name']} "
                f"({run['counter_keys']}): {left} of {run['batches_total']} batches to run, "
                f"{size}" + (" (paused)" if run["paused_at"] is not None else "")
            )
            if resumed and batch_size is not None and batch_size > run["batch_size"]:
                click.echo(
                    f"  --batch-size {batch_size}: this run's ranges were planned at "
                    f"{run['batch_size']:,} parents, so no transaction exceeds that; "
                    "plan anew with `enqueue --all` after it ends to use bigger ones"
                )


def _run_here(settings: Settings, plan: planning.BackfillPlan, *, show: bool) -> None:
    # Imported here: sending to workers (the usual case) needs neither.
    from . import runner
    from .heartbeat import Heartbeat

    engine = settings.engine()
    counters = {c.key: c for c in settings.counters()}
    bar = monitor.Bar(sys.stderr, "backfill") if show else None

    def on_batch(_: Any) -> None:
        if bar is not None:
            with engine.connect() as conn:
                bar.update(monitor.read_progress(conn, plan.run_ids))

    click.echo(f"running {len(plan.batch_ids)} batches in this process")
    heartbeat = Heartbeat(engine, None).start()  # `status` shows this process as a worker
    try:
        runner.run_inline(
            engine,
            counters,
            plan.batch_ids,
            on_batch=on_batch,
            pacing=settings.pacing,
            throttle=settings.throttle,
        )
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        click.echo(
            f"\ninterrupted: the batches done so far are saved. Continue with: {hint('enqueue')}",
            err=True,
        )
        raise click.exceptions.Exit(130) from None
    finally:
        heartbeat.stop()
        if bar is not None:
            bar.close()


def _report_drift(settings: Settings, counters: list[Counter], *, fix: bool, as_json: bool) -> None:
    """Run verify, print the drifts as a table, exit 1 on unrepaired drift."""
    from . import verify as verifying  # only verify and enqueue --verify need it

    engine = settings.engine()
    _require_columns(engine, counters)
    found = verifying.verify(engine, counters, fix=fix, batch_size=settings.batch_size)
    # A counter found exact (or repaired) is known to be exact: one without a
    # record (unknown) is recorded active under its current definition.
    wrong = {d.counter for d in found if not d.fixed}
    exact = [c for c in counters if c.key not in wrong]
    if exact:
        parts = {}
        for c in exact:
            described = definition.definition(c)
            parts[c.key] = (definition.fingerprint_of(described), definition.encode(described))
        with engine.begin() as conn:
            p.record_active(conn, exact, parts)
    if as_json:
        click.echo(json.dumps([d.as_json() for d in found]))
    elif found:
        click.echo(
            render_table(
                ("TABLE", "ID", "COLUMN", "CACHED", "ACTUAL"),
                [(d.table, d.id, d.column, d.cached, d.actual) for d in found],
            )
        )
    keys = ", ".join(c.key for c in counters)
    if not found:
        click.echo(f"no drift in {keys}", err=True)
    elif fix:
        click.echo(f"fixed {len(found)} drifted values in {keys}", err=True)
    else:
        click.echo(f"{len(found)} drifted values; repair them with `verify --fix`", err=True)
        click.get_current_context().exit(1)


@click.command("verify")
@click.argument("counters", nargs=-1, metavar="[COUNTER]...")
@click.option("--fix", is_flag=True, help="Repair each drift (under the batch lock).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of drifts.")
@click.pass_obj
def verify(settings: Settings, counters: tuple[str, ...], fix: bool, as_json: bool) -> None:
    """Compare cached counters with COUNT/SUM over their child tables; exit 1 on drift.

    Default: every active or unknown counter (pending ones are expected to be
    wrong until their backfill). Each drift prints as table, id, column,
    cached, actual. A counter with no record found exact (or fixed) is
    recorded as active.
    """
    declared, named = chosen_counters(settings, counters)
    chosen = named
    if not counters:
        p.upgrade_tables(settings.engine())
        with settings.engine().connect() as conn:
            states = {s.counter: s.state for s in p.statuses(conn, [c.key for c in declared])}
        ready = (p.ACTIVE, p.UNKNOWN)
        chosen = [c for c in declared if states[c.key] in ready]
        skipped = [c.key for c in declared if states[c.key] not in ready]
        if skipped:
            click.echo(f"skipped (not active yet): {', '.join(skipped)}", err=True)
        if not chosen:
            click.echo("no active counter to verify", err=True)
            return
    _report_drift(settings, chosen, fix=fix, as_json=as_json)


def register(group: Any) -> None:
    """Add the backfill commands to the ``counterfill`` click group."""
    group.add_command(enqueue)
    group.add_command(verify)
