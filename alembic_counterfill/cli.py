"""The ``counterfill`` click group: ``alembic counterfill ...`` and ``alembic-counterfill ...``.

Subcommands receive the :class:`~.config.Settings` as ``ctx.obj``; they are
built only when a subcommand actually runs, so ``--help`` needs no config
file. This module is also the one error boundary: library errors and
database errors become ``Error: <one line>`` and exit status 1 (click's usage
errors exit 2), with a traceback only under ``--raiseerr``.
"""

from __future__ import annotations

import functools
import gc
import json
import shlex
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click
import sqlalchemy as sa

from . import cli_backfill, cli_control, cli_fold, definition, progress
from .config import FileConfig, Settings, config_files, from_alembic_config
from .counters import Counter
from .errors import CounterfillError
from .text import render_table
from .urls import redact

_META_KEY = "alembic_counterfill.launch"
#: ``ctx.meta`` key of the command prefix hints repeat (``alembic -c pg.ini counterfill``).
PREFIX_KEY = "alembic_counterfill.prefix"
_FINAL_STATES = (progress.ACTIVE, progress.FAILED, progress.PAUSED, progress.UNKNOWN)


@dataclass
class Launch:
    """How the command was started: alembic's ``Config`` and/or the group's own options."""

    alembic_config: Any = None  # alembic.config.Config when run as ``alembic counterfill``
    config: tuple[str, ...] = ()
    name: str | None = None
    raiseerr: bool = False
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        """Build (once) the settings from the alembic config this command runs under."""
        if self._settings is None:
            settings = from_alembic_config(self._resolve_alembic_config())
            settings.raiseerr = self.raiseerr
            self._settings = settings
        return self._settings

    def _resolve_alembic_config(self) -> Any:
        if self.alembic_config is not None and not self.config and self.name is None:
            return self.alembic_config
        inherited = getattr(self.alembic_config, "cmd_opts", None)
        toml, ini = config_files(self.config or tuple(getattr(inherited, "config", None) or ()))
        options = Namespace(
            config=list(self.config) or getattr(inherited, "config", None),
            name=self.name or "alembic",
            x=getattr(inherited, "x", None),
            raiseerr=self.raiseerr,
        )
        # The files alone, as alembic reads them: importing alembic.config
        # would import all of alembic (config.FileConfig).
        return FileConfig(ini, toml, options.name, options)


def command_prefix(ctx: click.Context) -> str:
    """How the user started this group, options kept: for hints like ``… status --watch``."""
    launch = _launch(ctx)
    words: list[str] = []
    if launch.alembic_config is not None:
        opts = getattr(launch.alembic_config, "cmd_opts", None)
        words.append("alembic")
        for given in getattr(opts, "config", None) or ():
            words += ["-c", given]
        name = getattr(opts, "name", None)
        if name and name != "alembic":
            words += ["-n", name]
        words.append("counterfill")
    else:
        words.append("alembic-counterfill")
    for given in launch.config:
        words += ["-c", given]
    if launch.name:
        words += ["-n", launch.name]
    return " ".join(shlex.quote(w) for w in words)


def _launch(ctx: click.Context) -> Launch:
    launch = ctx.meta.get(_META_KEY)
    if launch is None:
        launch = ctx.meta[_META_KEY] = Launch()
    return launch


def _with_settings(callback: Callable[..., Any]) -> Callable[..., Any]:
    # Runs after click parsed the subcommand's arguments (so after --help
    # exited): only real runs read the configuration.
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.obj = _launch(ctx).settings()
        return callback(*args, **kwargs)

    return wrapper


class CounterfillGroup(click.Group):
    """A click group that gives subcommands their Settings and turns errors into one line."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Register ``cmd``, arranging for ``ctx.obj`` to be the Settings when it runs."""
        if cmd.callback is not None:
            cmd.callback = _with_settings(cmd.callback)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; translate library and database errors at this one boundary."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except CounterfillError as exc:
            _fail(ctx, exc, str(exc))
        except sa.exc.DBAPIError as exc:
            _fail(ctx, exc, _database_message(ctx, exc))


def _fail(ctx: click.Context, exc: BaseException, message: str) -> NoReturn:
    if _launch(ctx).raiseerr:
        raise exc
    raise click.ClickException(" ".join(message.split())) from None


def _database_message(ctx: click.Context, exc: sa.exc.DBAPIError) -> str:
    settings = _launch(ctx)._settings
    url = "the database"
    if settings is not None:
        url = redact(settings.database_url)
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    return (
        f"cannot use database {url}: {detail}; check sqlalchemy.url (or [counterfill] "
        "database_url), that the server is running and that alembic upgrade head has run"
    )


_ENVIRONMENT = """\b
Environment variables:
  COUNTERFILL_BROKER_URL        broker URL, overrides [counterfill] broker_url
  COUNTERFILL_BATCH_SIZE        enqueue --batch-size
  COUNTERFILL_WAIT              enqueue --wait
  COUNTERFILL_VERIFY            enqueue --verify
  COUNTERFILL_MAX_ROWS_PER_SECOND  enqueue --max-rows-per-second
  ALEMBIC_CONFIG                config file (also for workers: dramatiq has no -c)
  COUNTERFILL_MAX_RETRIES, COUNTERFILL_MIN_BACKOFF, COUNTERFILL_MAX_BACKOFF,
  COUNTERFILL_TIME_LIMIT        worker tuning (milliseconds for times)
"""


@click.group(cls=CounterfillGroup, epilog=_ENVIRONMENT)
@click.option(
    "-c",
    "--config",
    multiple=True,
    metavar="FILE",
    help="Alembic config file (alembic.ini and/or pyproject.toml); default: $ALEMBIC_CONFIG "
    "or ./alembic.ini.",
)
@click.option("-n", "--name", default=None, help="Section of the ini file with alembic's config.")
@click.option("-x", "x", multiple=True, help="Extra arguments, as for alembic -x.")
@click.option("--raiseerr", is_flag=True, help="Show a full traceback on error.")
@click.pass_context
def cli(
    ctx: click.Context,
    config: tuple[str, ...],
    name: str | None,
    x: tuple[str, ...],  # accepted like alembic's -x; no command reads it
    raiseerr: bool,
) -> None:
    """Keep counter caches exact: see which counters need a backfill, run and verify backfills."""
    alembic_config = ctx.obj
    inherited = getattr(alembic_config, "cmd_opts", None)
    ctx.meta[_META_KEY] = Launch(
        alembic_config=alembic_config,
        config=config,
        name=name,
        raiseerr=raiseerr or bool(getattr(inherited, "raiseerr", False)),
    )
    ctx.obj = None  # the Settings, once a subcommand runs
    ctx.meta[PREFIX_KEY] = command_prefix(ctx)


def _read_statuses(settings: Settings, counters: Sequence[Counter]) -> list[progress.CounterStatus]:
    """Each counter's status, flagged when its column is missing or its definition changed."""
    with settings.engine().connect() as connection:
        found = progress.statuses(
            connection, [c.key for c in counters], definition.fingerprints(list(counters))
        )
        missing = set(progress.missing_columns(connection, counters))
    for st in found:
        if st.counter in missing:
            st.hint = (
                "the column is not in this database: run `alembic upgrade head` "
                "(is sqlalchemy.url the right database?)"
            )
    return found


def _state_label(st: progress.CounterStatus) -> str:
    return f"{st.state} (definition changed)" if st.definition_changed else st.state


def _hints(statuses: Sequence[progress.CounterStatus]) -> str:
    hints = [f"  {s.counter}: {s.hint}" for s in statuses if s.hint]
    return "\n\nnext steps:\n" + "\n".join(hints) if hints else ""


def describe_counter(counter: Counter) -> str:
    """What a counter counts, e.g. ``COUNT(follows) BY follows.followed_id``."""
    child = counter.child_table.name
    what = (
        f"SUM({counter.summed.table.name}.{counter.summed.name})"
        if counter.summed is not None
        else f"COUNT({child})"
    )
    text = f"{what} BY {child}.{counter.fk.name}"
    if counter.where is not None:
        try:
            where = counter.where.compile(compile_kwargs={"literal_binds": True})
        except Exception:  # a type without a literal form: show the parameterised SQL
            where = counter.where.compile()
        text += f" WHERE {where}"
    return text


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_obj
def list_(settings: Settings, as_json: bool) -> None:
    """List the declared counters, what each one counts, and its state."""
    counters = settings.counters()
    progress.upgrade_tables(settings.engine())  # tables of an older release: add columns
    found = {s.counter: s for s in _read_statuses(settings, counters)}
    states = {k: s.state for k, s in found.items()}
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "counter": c.key,
                        "state": states[c.key],
                        "table": c.parent_table.name,
                        "column": c.name,
                        "child_table": c.child_table.name,
                        "foreign_key": c.fk.name,
                        "sum": c.summed.name if c.summed is not None else None,
                        "where": c.where is not None,
                        "definition_changed": found[c.key].definition_changed,
                        "hint": found[c.key].hint,
                    }
                    for c in counters
                ]
            )
        )
        return
    if not counters:
        click.echo(f"no counters declared in {settings.metadata_path}")
        return
    click.echo(
        render_table(
            ("COUNTER", "STATE", "COUNTS"),
            [(c.key, _state_label(found[c.key]), describe_counter(c)) for c in counters],
        )
        + _hints(list(found.values()))
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{_duration(seconds)} ago"


def render_statuses(statuses: Sequence[progress.CounterStatus]) -> str:
    """The human ``status`` table, then notes: why batches back off, last errors, workers."""
    rows = [
        (
            s.counter,
            _state_label(s),
            f"{s.batches_done}/{s.batches_total}" if s.batches_total else "-",
            str(s.batches_failed) if s.batches_total else "-",
            f"{s.rows_changed:,}" if s.batches_total else "-",
            f"{s.rate:,.0f}/s" if s.rate and s.activity else "-",
            _duration(s.eta_seconds) if s.activity in ("running", "throttled") else "-",
            s.activity or "-",
            _ago(s.last_batch_seconds_ago) if s.batches_total else "-",
            (f"{s.batch_size:,}" + (" pinned" if s.pinned else "")) if s.activity else "-",
        )
        for s in statuses
    ]
    text = render_table(
        (
            "COUNTER",
            "STATE",
            "BATCHES",
            "FAILED",
            "ROWS CHANGED",
            "RATE",
            "ETA",
            "ACTIVITY",
            "LAST BATCH",
            "SIZE",
        ),
        rows,
    )
    notes = [
        f"throttled: {reason}" for reason in sorted({s.throttled for s in statuses if s.throttled})
    ]
    notes += [f"{s.counter}: {s.retrying} batch(es) retrying" for s in statuses if s.retrying]
    busy = [s for s in statuses if s.activity]
    if busy:
        notes.append(f"workers alive: {busy[0].workers_alive}")
        if any(s.activity == "stalled" for s in busy):
            notes.append(
                "stalled: no worker heartbeat and no batch lately; start workers "
                "(dramatiq alembic_counterfill.worker) or run `enqueue --inline`"
            )
        if any(s.activity == "paused" for s in busy):
            notes.append("paused: `resume` continues where the batches stopped")
    errors = [f"{s.counter}: {s.last_error}" for s in statuses if s.last_error]
    if errors:
        notes += ["", "last errors:"] + ["  " + " ".join(e.split())[:200] for e in errors]
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text + _hints(statuses)


@cli.command("status")
@click.argument("counters", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per counter.")
@click.option(
    "--watch", is_flag=True, help="Refresh until every counter is active or failed (or Ctrl-C)."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.pass_obj
def status(
    settings: Settings, counters: tuple[str, ...], as_json: bool, watch: bool, interval: float
) -> None:
    """Show each counter's state (unknown, pending, backfilling, active, failed) and progress.

    COUNTERS (keys like users.followers_count) narrow the output; default: all declared.
    With --json --watch, each refresh prints one JSON array on its own line.
    """
    chosen = cli_backfill.chosen_counters(settings, counters)[1]
    clear = watch and not as_json and sys.stdout.isatty()
    progress.upgrade_tables(settings.engine())  # tables of an older release: add columns
    try:
        while True:
            current = _read_statuses(settings, chosen)
            with settings.engine().connect() as connection:
                cli_fold.annotate(connection, current, chosen)
            if clear:
                click.clear()
            if as_json:
                click.echo(json.dumps([s.as_json() for s in current]))
            else:
                click.echo(render_statuses(current) + cli_fold.render(current))
            if not watch or all(s.state in _FINAL_STATES for s in current):
                return
            if not clear:
                click.echo("")
            time.sleep(interval)
    except KeyboardInterrupt:  # Ctrl-C is how a watch normally ends
        return


@cli.command("cancel")
@click.argument("counters", nargs=-1, metavar="[COUNTER]...")
@click.pass_obj
def cancel(settings: Settings, counters: tuple[str, ...]) -> None:
    """End the unfinished backfill runs of the COUNTERs named (default: every unfinished run).

    Batches still queued are skipped when delivered. Counters of an ended run
    go back to pending (or stay active if they were exact before a recount);
    `enqueue` plans a fresh run. COUNTER may also name a counter the models no
    longer declare.
    """
    declared = {c.key for c in settings.counters()}
    r = progress.runs_table
    progress.upgrade_tables(settings.engine())
    with settings.engine().begin() as conn:
        if not progress.has_tables(conn):
            click.echo("nothing to cancel: no backfill was ever planned in this database")
            return
        recorded = set(progress.counter_rows(conn))
        unknown = [k for k in counters if k not in declared | recorded]
        if unknown:
            known = ", ".join(sorted(declared | recorded)) or "none"
            raise click.BadParameter(
                f"unknown counter {unknown[0]!r}; known counters: {known}", param_hint="COUNTER"
            )
        runs = conn.execute(
            sa.select(r.c.id, r.c.table_name, r.c.counter_keys)
            .where(r.c.state.not_in(progress.RUN_ENDED))
            .order_by(r.c.id)
        ).all()
        ended = [
            run for run in runs if not counters or set(counters) & set(run.counter_keys.split(","))
        ]
        if ended:
            conn.execute(
                sa.update(r)
                .where(r.c.id.in_([run.id for run in ended]))
                .values(state=progress.RUN_CANCELLED, finished_at=progress.now())
            )
            conn.execute(progress.release_statement())
    if not ended:
        named = ", ".join(counters) if counters else "any counter"
        click.echo(f"nothing to cancel: {named} has no unfinished run")
        return
    for run in ended:
        click.echo(f"cancelled run {run.id} on {run.table_name} ({run.counter_keys})")
    click.echo("run `alembic counterfill enqueue` to plan a fresh backfill")


cli_backfill.register(cli)
cli_control.register(cli)
cli_fold.register(cli)


def run_from_alembic(alembic_config: Any, args: list[str]) -> None:
    """Entry point for ``alembic counterfill ARGS``, with the ``Config`` alembic built."""
    cli.main(args=args, prog_name="alembic counterfill", obj=alembic_config)


def main() -> None:
    """Console script ``alembic-counterfill``."""
    try:
        cli.main(prog_name="alembic-counterfill")
    finally:
        _quick_exit()


def _quick_exit() -> None:
    """Spare the interpreter's shutdown a garbage collection of everything the command imported.

    Only the console script calls it (``alembic counterfill`` may run inside
    a longer-lived process): its process ends next, and collecting
    SQLAlchemy's, the models' and Dramatiq's objects one by one took
    0.1-0.9 s after the command's output (docs/performance.md). Frozen
    objects are simply not collected; atexit handlers and the streams'
    flushes still run.
    """
    gc.freeze()
