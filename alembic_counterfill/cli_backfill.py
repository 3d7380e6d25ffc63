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

from . import monitor, planning, runner
from . import progress as p
from . import verify as verifying
from .actors import broker_from_url, ping, redact, send_batches
from .counters import Counter, select_counters
from .errors import CounterfillError, UnknownCounterError

if TYPE_CHECKING:
    from .config import Settings


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


@click.command("enqueue")
@click.argument("counters", nargs=-1, metavar="[COUNTER]...")
@click.option(
    "--all", "everything", is_flag=True, help="Every declared counter, active ones included."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    envvar="BATCH_SIZE",
    default=None,
    help="Parents per batch (env BATCH_SIZE; default: [counterfill] batch_size or 10000).",
)
@click.option(
    "--wait", is_flag=True, envvar="WAIT", help="Show progress until done, then a summary."
)
@click.option(
    "--verify",
    "check",
    is_flag=True,
    envvar="VERIFY",
    help="After --wait, verify (implies --wait).",
)
@click.option("--inline", is_flag=True, help="Run the batches in this process, with no broker.")
@click.pass_obj
def enqueue(
    settings: Settings,
    counters: tuple[str, ...],
    everything: bool,
    batch_size: int | None,
    wait: bool,
    check: bool,
    inline: bool,
) -> None:
    """Plan and send backfills for counters that are not active (or the COUNTERs named).

    Re-running resumes: only batches that are not done are sent again. Without
    a broker_url (or with --inline) the batches run here, one after another.
    """
    try:
        planning.check_choice(counters, everything)
    except CounterfillError as exc:  # exit 2: the arguments are wrong
        raise click.UsageError(str(exc)) from None
    declared, named = chosen_counters(settings, counters)
    engine = settings.engine()
    in_process = inline or not settings.broker_url
    planning_started = time.monotonic()
    broker = None
    if not in_process:
        assert settings.broker_url is not None
        broker = broker_from_url(settings.broker_url, sending=True)
    try:
        if broker is not None and settings.broker_url:
            ping(broker, settings.broker_url)  # before planning: a dead broker changes nothing
        with engine.begin() as conn:
            chosen = named if counters else planning.choose(conn, declared, (), everything)
            if not chosen:
                click.echo("nothing to backfill: every counter is active (use --all to recount)")
                return
            plan = planning.plan(conn, chosen, batch_size or settings.batch_size)
        _describe_plan(engine, plan)
        if broker is not None and settings.broker_url:
            sent = send_batches(broker, settings.queue, plan.batch_ids)
            with engine.begin() as conn:
                planning.mark_sent(conn, plan.batch_ids)
            click.echo(
                f"sent {sent} batches to queue {settings.queue!r} on "
                f"{redact(settings.broker_url)} "
                f"(planned and sent in {time.monotonic() - planning_started:.2f}s)"
            )
    finally:
        if broker is not None:
            broker.close()
    started = time.monotonic()
    if in_process:
        _run_here(settings, plan, show=wait or check)
    elif wait or check:
        monitor.wait(engine, plan.run_ids, stream=sys.stderr)
    else:
        click.echo("follow with: alembic counterfill status --watch")
        return
    with engine.connect() as conn:
        lines = monitor.summary(conn, plan.run_ids, time.monotonic() - started)
        failed = monitor.read_progress(conn, plan.run_ids).batches_failed
    for line in lines:
        click.echo(line)
    if failed:
        raise CounterfillError(
            f"{failed} batches failed (errors above and in `status`); fix the cause, "
            "then run `enqueue` again to retry them"
        )
    if check:
        keys = {k for run in _run_keys(engine, plan.run_ids) for k in run}
        _report_drift(settings, [c for c in declared if c.key in keys], fix=False, as_json=False)


def _run_keys(engine: Any, run_ids: list[int]) -> list[list[str]]:
    r = p.runs_table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(r.c.counter_keys).where(r.c.id.in_(run_ids))).scalars()
        return [keys.split(",") for keys in rows]


def _describe_plan(engine: Any, plan: planning.BackfillPlan) -> None:
    r = p.runs_table
    with engine.connect() as conn:
        runs = conn.execute(sa.select(r).where(r.c.id.in_(plan.run_ids)).order_by(r.c.id))
        for run in runs.mappings():
            verb = "resuming" if run["id"] in plan.resumed_run_ids else "planned"
            left = run["batches_total"] - run["batches_done"]
            click.echo(
                f"{verb} run {run['id']} on {run['table_name']} ({run['counter_keys']}): "
                f"{left} of {run['batches_total']} batches to run"
            )


def _run_here(settings: Settings, plan: planning.BackfillPlan, *, show: bool) -> None:
    engine = settings.engine()
    counters = {c.key: c for c in settings.counters()}
    bar = monitor.Bar(sys.stderr, "backfill") if show else None

    def on_batch(_: Any) -> None:
        if bar is not None:
            with engine.connect() as conn:
                bar.update(monitor.read_progress(conn, plan.run_ids))

    click.echo(f"running {len(plan.batch_ids)} batches in this process")
    try:
        runner.run_inline(engine, counters, plan.batch_ids, on_batch=on_batch)
    finally:
        if bar is not None:
            bar.close()


def _report_drift(settings: Settings, counters: list[Counter], *, fix: bool, as_json: bool) -> None:
    """Run verify, print each drift, exit 1 on unrepaired drift."""
    shown = 0

    def show(drift: verifying.Finding) -> None:
        nonlocal shown
        if not as_json:
            if shown == 0:
                click.echo("TABLE\tID\tCOLUMN\tCACHED\tACTUAL")
            click.echo(f"{drift.table}\t{drift.id}\t{drift.column}\t{drift.cached}\t{drift.actual}")
        shown += 1

    found = verifying.verify(
        settings.engine(), counters, fix=fix, batch_size=settings.batch_size, on_drift=show
    )
    if as_json:
        click.echo(json.dumps([d.as_json() for d in found]))
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

    Default: every active counter (pending ones are expected to be wrong until
    their backfill). Each drift prints as table, id, column, cached, actual.
    """
    declared, named = chosen_counters(settings, counters)
    chosen = named
    if not counters:
        with settings.engine().connect() as conn:
            states = {s.counter: s.state for s in p.statuses(conn, [c.key for c in declared])}
        chosen = [c for c in declared if states[c.key] == p.ACTIVE]
        skipped = [c.key for c in declared if states[c.key] != p.ACTIVE]
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
