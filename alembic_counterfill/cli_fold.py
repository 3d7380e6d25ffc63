"""``fold``, and the pending-deltas lines of ``status``: the buffered counters' commands.

Thin like the other command modules: :mod:`.fold` does the work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from . import buffer
from .cli_backfill import chosen_counters
from .counters import Counter

if TYPE_CHECKING:
    from . import fold as folding
    from .config import Settings
    from .progress import CounterStatus


@click.command("fold")
@click.argument("counters", nargs=-1, metavar="[COUNTER]...")
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=buffer.FOLD_CHUNK,
    show_default=True,
    help="Parents folded per transaction.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a line.")
@click.pass_obj
def fold(settings: Settings, counters: tuple[str, ...], chunk: int, as_json: bool) -> None:
    """Move the pending deltas of buffered (hot-parent) counters into their columns.

    COUNTERs (keys like users.followers_count) choose the parent tables to fold;
    default: every buffered counter. Safe to run while writers, workers and
    backfills run; a fold interrupted at any point loses or repeats nothing.
    """
    chosen = chosen_counters(settings, counters)[1]
    plain = [c.key for c in chosen if not buffer.is_buffered(c)]
    if counters and plain:
        raise click.BadParameter(
            f"{', '.join(plain)} not buffered (nothing to fold); "
            "declare it with counter_cache(..., buffered=True) or leave it out",
            param_hint="COUNTER",
        )
    # Imported here: fold brings the SQL builders, which other commands
    # (enqueue without --inline, status) do not use.
    from . import fold as folding

    outcome = folding.fold(settings.engine(), chosen, chunk=chunk)
    tables = [t.name for t in folding.parent_tables(chosen)]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "tables": tables,
                    "parents": outcome.parents,
                    "deltas": outcome.deltas,
                    "transactions": outcome.transactions,
                    "seconds": round(outcome.seconds, 3),
                }
            )
        )
    elif not tables:
        click.echo("no buffered counters declared: nothing to fold")
    else:
        click.echo(
            f"folded {outcome.deltas} pending deltas into {outcome.parents} parents "
            f"of {', '.join(tables)} ({outcome.transactions} transactions, "
            f"{outcome.seconds:.2f}s)"
        )


def annotate(conn: Any, statuses: Sequence[CounterStatus], counters: Sequence[Counter]) -> None:
    """Fill ``pending_deltas`` and ``oldest_delta_seconds`` of each buffered counter's status."""
    by_key = {c.key: c for c in counters}
    seen: dict[Any, folding.Pending] = {}
    for st in statuses:
        counter = by_key.get(st.counter)
        if counter is None or not buffer.is_buffered(counter):
            continue
        table = counter.parent_table
        if table not in seen:
            from . import fold as folding  # only with buffered counters (see fold)

            seen[table] = folding.pending(conn, table)
        st.pending_deltas = seen[table].deltas
        st.oldest_delta_seconds = seen[table].oldest_seconds


def render(statuses: Sequence[CounterStatus]) -> str:
    """The lines ``status`` prints under its table for buffered counters ('' if none)."""
    lines = []
    for st in statuses:
        if st.pending_deltas is None:
            continue
        age = "-" if st.oldest_delta_seconds is None else f"{st.oldest_delta_seconds:.1f}s"
        lines.append(f"  {st.counter}: {st.pending_deltas} pending deltas, oldest {age}")
    return "\n\nbuffered counters (fold lag):\n" + "\n".join(lines) if lines else ""


def register(group: Any) -> None:
    """Add ``fold`` to the ``counterfill`` click group."""
    group.add_command(fold)
