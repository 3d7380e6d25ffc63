"""``python -m example_project demo``: the whole story, run with the real commands a user types.

Steps: migrate the base schema, load stale data with the generator, apply the
counter migration, show ``counterfill status`` (pending), run ``counterfill
enqueue --wait --verify``, show status again (active), then compare profile
reads. Each command is echoed, then run as a subprocess of the real ``alembic``
(and ``python -m example_project``) executables of this environment.

Everything the demo writes lives in its work directory (``./demo/``): an
``alembic.ini`` pointing at the example's migrations, the SQLite file of the
embedded default, and worker logs. With ``--broker-url`` the demo starts
``dramatiq alembic_counterfill.worker`` processes itself and always stops them.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from .errors import ExampleError

#: The base schema's revision: the app before counter caches.
BASE_REVISION = "0001"
#: Tables the example's migrations own; the demo only ever drops these (and the library's).
APP_TABLES = ("users", "follows", "posts")
BOOKKEEPING_PREFIX = "counterfill_"
#: How long stopping workers may take before they are killed.
STOP_TIMEOUT = 20.0

INI_TEMPLATE = """\
# Written by `python -m example_project demo`; rewritten on every run.
[alembic]
script_location = {script_location}
sqlalchemy.url = {url}

[counterfill]
metadata = example_project.models:Base
batch_size = {batch_size}
{broker_line}
[loggers]
keys = root,sqlalchemy,alembic,alembic_counterfill

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = INFO
handlers =
qualname = alembic

# Batch lines would scroll the progress bar away; workers log them to their own files.
[logger_alembic_counterfill]
level = WARNING
handlers =
qualname = alembic_counterfill

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
"""


def _ini_value(value: str) -> str:
    # alembic.ini goes through configparser interpolation: a literal % is %%.
    return value.replace("%", "%%")


def _shown(path: Path | str) -> str:
    """``path`` relative to the current directory when it lies below it, as a user would type it."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tool(name: str) -> str:
    """The console script ``name`` of this Python environment (not whatever is first on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise ExampleError(
        f"the {name!r} executable is not installed next to {sys.executable}; "
        "install the package in this environment: pip install -e ."
    )


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text[-lines:])


class _Terminated(Exception):
    """SIGTERM arrived: unwind like Ctrl-C so the workers are stopped."""


@dataclass
class Demo:
    """One run of the demo; :meth:`run` returns the exit status."""

    users: int
    seed: int = 42
    database_url: str | None = None
    broker_url: str | None = None
    workdir: Path = Path("demo")
    batch_size: int | None = None
    workers: int = 2
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    _workers: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _step: int = field(default=0, init=False)

    STEPS = 7

    # -- set-up ---------------------------------------------------------------

    @property
    def ini(self) -> Path:
        """The alembic config the demo writes and every command uses."""
        return self.workdir / "alembic.ini"

    @property
    def default_db(self) -> Path:
        """The embedded default's SQLite file."""
        return self.workdir / "demo.db"

    def url(self) -> str:
        """The database URL in use."""
        return self.database_url or f"sqlite:///{self.default_db.resolve()}"

    def say(self, text: str = "") -> None:
        """Print a line of the demo's own narration."""
        print(text, file=self.out, flush=True)

    def prepare(self) -> None:
        """Create the work directory, start from a clean database and write alembic.ini."""
        if self.users < 1:
            raise ExampleError(f"--users must be at least 1, got {self.users}")
        if self.workers < 1:
            raise ExampleError(f"--workers must be at least 1, got {self.workers}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.workdir.glob("demo.db*"), *self.workdir.glob("worker-*.log")]:
            leftover.unlink()
        batch = self.batch_size or min(5000, max(10, self.users // 50))
        broker = f"broker_url = {_ini_value(self.broker_url)}\n" if self.broker_url else ""
        migrations = Path(__file__).resolve().parent / "migrations"
        self.ini.write_text(
            INI_TEMPLATE.format(
                script_location=_ini_value(str(migrations)),
                url=_ini_value(self.url()),
                batch_size=batch,
                broker_line=broker,
            )
        )
        if self.database_url:
            self._reset_database()

    def _reset_database(self) -> None:
        """Bring a database given by URL back to empty, touching only the example's tables."""
        engine = sa.create_engine(self.url())
        try:
            with engine.connect() as conn:
                tables = set(sa.inspect(conn).get_table_names())
            if "alembic_version" in tables and tables & set(APP_TABLES):
                self.say("The database has a previous demo in it: migrate it down first.")
                self.alembic("downgrade", "base")
            with engine.begin() as conn:
                leftovers = sa.MetaData()
                leftovers.reflect(conn, only=lambda name, _: name.startswith(BOOKKEEPING_PREFIX))
                if leftovers.tables:
                    names = ", ".join(sorted(leftovers.tables))
                    self.say(f"Dropping the previous demo's bookkeeping tables: {names}")
                    leftovers.drop_all(conn)
                remaining = set(sa.inspect(conn).get_table_names()) & set(APP_TABLES)
        finally:
            engine.dispose()
        if remaining:
            raise ExampleError(
                f"the database already has table(s) {', '.join(sorted(remaining))} that the "
                "example's migrations did not create; give the demo an empty database or schema"
            )

    # -- running commands -------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment of every command: the demo's mode decides the broker, not the shell's."""
        env = dict(os.environ)
        env["ALEMBIC_CONFIG"] = str(self.ini.resolve())
        if self.broker_url:
            env["COUNTERFILL_BROKER_URL"] = self.broker_url
        else:
            # An inherited broker URL would send the batches to a broker nobody consumes.
            env.pop("COUNTERFILL_BROKER_URL", None)
        return env

    @staticmethod
    def typed(argv: list[str]) -> str:
        """A command the way the user would type it (paths relative to the current directory)."""
        return shlex.join([_shown(a) if os.path.isabs(a) else a for a in argv])

    def show(self, argv: list[str]) -> None:
        """Echo a command before running it."""
        self.say(f"$ {self.typed(argv)}")

    def run(self) -> int:
        """Run every step; raise :class:`ExampleError` naming the step that failed."""
        started = time.perf_counter()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self.prepare()
            self.steps()
        except _Terminated:
            self.say("demo: terminated")
            return 143
        finally:
            self.stop_workers()
            signal.signal(signal.SIGTERM, previous)
        self.say()
        self.say(
            f"demo: all steps passed in {time.perf_counter() - started:.1f} s; "
            "verify found no drift"
        )
        return 0

    @staticmethod
    def _on_sigterm(signum: int, frame: Any) -> None:
        raise _Terminated

    def heading(self, text: str) -> None:
        """Start the next numbered step."""
        self._step += 1
        self.say()
        self.say(f"== {self._step}/{self.STEPS} {text}")

    def command(self, argv: list[str], what: str) -> None:
        """Echo and run one command; raise if it fails."""
        self.show(argv)
        started = time.perf_counter()
        code = subprocess.call(argv, env=self.env())
        if code != 0:
            raise ExampleError(
                f"{what} failed: `{self.typed(argv)}` exited with status {code}; "
                "its message is above"
            )
        self.say(f"   ({time.perf_counter() - started:.1f} s)")

    def alembic(self, *args: str) -> None:
        """Run ``alembic -c <demo ini> ARGS``."""
        argv = [_tool("alembic"), "-c", str(self.ini), *args]
        self.command(argv, f"alembic {' '.join(args)}")

    def example(self, *args: str) -> None:
        """Run ``python -m example_project ARGS`` with the demo's config."""
        argv = [sys.executable, "-m", "example_project", args[0], "-c", str(self.ini), *args[1:]]
        self.command(argv, f"example_project {args[0]}")

    def steps(self) -> None:
        """The demo proper."""
        where = "embedded default: SQLite file, batches run in-process"
        if self.broker_url:
            broker = sa.make_url(self.broker_url).drivername
            where = f"{sa.make_url(self.url()).get_backend_name()}, {broker} broker, "
            where += f"{self.workers} dramatiq workers"
        elif self.database_url:
            where = f"{sa.make_url(self.url()).get_backend_name()}, batches run in-process"
        self.say(f"demo: {self.users:,} users on {where}; config {_shown(self.ini.resolve())}")

        self.heading(f"Migrate to the base schema ({BASE_REVISION}): the app before counter caches")
        self.alembic("upgrade", BASE_REVISION)

        self.heading("Load data with bulk inserts that bypass the ORM (what makes counters stale)")
        self.example("seed", "--users", str(self.users), "--seed", str(self.seed))

        self.heading("Add the counter caches: the migration only records that backfills are due")
        self.alembic("upgrade", "head")

        self.heading("Status before the backfill")
        self.alembic("counterfill", "status")

        if self.broker_url:
            self.start_workers()
        self.heading("Backfill in the background, wait for it, then verify against COUNT(*)")
        self.enqueue()

        self.heading("Status after the backfill")
        self.alembic("counterfill", "status")

        self.heading("Profile read: COUNT(*) on the child tables versus the counter columns")
        self.example("profile")

    # -- workers ----------------------------------------------------------------

    def start_workers(self) -> None:
        """Start ``--workers`` dramatiq worker processes on the demo's config."""
        args = ["alembic_counterfill.worker", "--processes", "1", "--threads", "2"]
        argv = [_tool("dramatiq"), *args]
        self.say()
        self.say(f"Starting {self.workers} workers (logs in {_shown(self.workdir.resolve())}/):")
        config = _shown(self.ini.resolve())
        self.say(f"$ ALEMBIC_CONFIG={config} {shlex.join(['dramatiq', *args])} &")
        for i in range(1, self.workers + 1):
            log = self.workdir / f"worker-{i}.log"
            with log.open("wb") as fh:
                # Own session: stopping the demo's workers signals their whole process group.
                proc = subprocess.Popen(
                    argv,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=self.env(),
                    start_new_session=True,
                )
            self._workers.append(proc)
        self.say(f"   worker pids: {' '.join(str(p.pid) for p in self._workers)}")

    def enqueue(self) -> None:
        """Run ``counterfill enqueue --wait --verify``, failing fast if every worker has died."""
        args = ["counterfill", "enqueue", "--wait", "--verify"]
        argv = [_tool("alembic"), "-c", str(self.ini), *args]
        self.show(argv)
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=self.env())
        try:
            while proc.poll() is None:
                if self._workers and all(w.poll() is not None for w in self._workers):
                    proc.terminate()
                    proc.wait()
                    self._worker_logs()
                    raise ExampleError(
                        "every worker exited before the backfill finished; "
                        f"see the logs in {_shown(self.workdir.resolve())}/"
                    )
                time.sleep(0.2)
        except BaseException:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            raise
        if proc.returncode != 0:
            logs = f"; worker logs: {_shown(self.workdir.resolve())}/" if self._workers else ""
            raise ExampleError(
                f"the backfill failed: `{self.typed(argv)}` exited with status "
                f"{proc.returncode}; its message is above{logs}"
            )
        self.say(f"   ({time.perf_counter() - started:.1f} s)")

    def _worker_logs(self) -> None:
        for i, _ in enumerate(self._workers, 1):
            log = self.workdir / f"worker-{i}.log"
            print(f"--- last lines of {_shown(log.resolve())}:\n{_tail(log)}", file=sys.stderr)

    def stop_workers(self) -> None:
        """SIGTERM every worker, wait for them, SIGKILL the ones that outstay ``STOP_TIMEOUT``."""
        if not self._workers:
            return
        for proc in self._workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        killed = 0
        for proc in self._workers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed += 1
                self._kill_group(proc.pid)
                proc.wait()
            # Worker children the main process did not take down with it.
            self._kill_group(proc.pid)
        note = f", {killed} killed after {STOP_TIMEOUT:.0f} s" if killed else ""
        self.say(f"Stopped {len(self._workers)} workers{note}.")
        self._workers.clear()

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
