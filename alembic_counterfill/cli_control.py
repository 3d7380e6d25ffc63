"""``pause`` and ``resume``: the run-control commands of the ``counterfill`` click group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from . import control
from .cli_backfill import chosen_counters, hint

if TYPE_CHECKING:
    from .config import Settings


def _keys(settings: Settings, names: tuple[str, ...]) -> list[str]:
    return [c.key for c in chosen_counters(settings, names)[1]]


def _report(change: control.Change, verb: str) -> None:
    if change.changed:
        click.echo(f"{verb}: {', '.join(change.changed)}")
    for key, state in change.unchanged.items():
        click.echo(f"{key}: {state}, left as it is", err=True)


@click.command("pause")
@click.argument("counters", nargs=-1, metavar="[COUNTER]...")
@click.pass_obj
def pause(settings: Settings, counters: tuple[str, ...]) -> None:
    """Pause the backfills of COUNTERs (default: all): workers leave their batches for later.

    A counter's whole run pauses (every counter of its parent table that is
    recounted in the same pass). Batches already in a transaction finish it.
    """
    keys = _keys(settings, counters)
    with settings.engine().begin() as conn:
        change = control.pause(conn, keys)
    _report(change, "paused")
    if change.changed:
        click.echo(f"continue with: {hint('resume')}")


@click.command("resume")
@click.argument("counters", nargs=-1, metavar="[COUNTER]...")
@click.pass_obj
def resume(settings: Settings, counters: tuple[str, ...]) -> None:
    """Resume paused backfills of COUNTERs (default: all) from where their batches stopped."""
    keys = _keys(settings, counters)
    with settings.engine().begin() as conn:
        change = control.resume(conn, keys)
    _report(change, "resumed")
    if change.changed and not settings.broker_url:
        # No workers: batches run in `enqueue`'s own process.
        click.echo(f"no broker configured: run the rest here with {hint('enqueue')}")
    elif change.changed:
        click.echo(f"workers pick the batches up again; follow with: {hint('status --watch')}")


def register(group: Any) -> None:
    """Add the run-control commands to the ``counterfill`` click group."""
    group.add_command(pause)
    group.add_command(resume)
