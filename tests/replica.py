"""A private PostgreSQL primary and streaming replica on free ports, for replica-lag tests.

The pair lives in a temporary directory with its own ``pg_hba.conf`` (the
shared test server allows no replication connections, and a paused replica
of it would throttle every other test's batches). As root, the servers run
as the ``postgres`` user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import sqlalchemy as sa
from typing_extensions import Self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        raise RuntimeError("pg_config not found (install the PostgreSQL server package)")
    out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


class ReplicaPair:
    """``with ReplicaPair() as pair:`` a primary and a replica streaming from it, removed after."""

    def __init__(self) -> None:
        self.bin = _bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="cf_replica_"))
        self.primary_port = _free_port()
        self.replica_port = _free_port()
        self.started: list[Path] = []
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        cmd = [*self.user, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stdout}{done.stderr}")

    def url(self, port: int) -> str:
        """A URL of the ``postgres`` database on ``port``."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def _start(self, data: Path) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", f"{data}.log", "-w", "start")
        self.started.append(data)

    def __enter__(self) -> Self:
        try:
            if self.user:
                shutil.chown(self.dir, "postgres")
            primary, replica = self.dir / "primary", self.dir / "replica"
            self._run(str(self.bin / "initdb"), "-D", str(primary), "-U", "postgres", "-A", "trust")
            conf = [
                f"port = {self.primary_port}",
                "listen_addresses = '127.0.0.1'",
                f"unix_socket_directories = '{self.dir}'",
                "wal_level = replica",
                "fsync = off",
            ]
            with open(primary / "postgresql.conf", "a") as f:
                f.write("\n".join(conf) + "\n")
            with open(primary / "pg_hba.conf", "a") as f:
                f.write("host replication all 127.0.0.1/32 trust\n")
            self._start(primary)
            self._run(
                str(self.bin / "pg_basebackup"),
                *("-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres"),
                *("-D", str(replica), "-R", "-X", "stream", "-c", "fast"),
            )
            with open(replica / "postgresql.conf", "a") as f:
                # Frequent standby replies: the primary's lag figures follow quickly.
                f.write(f"port = {self.replica_port}\nwal_receiver_status_interval = 1\n")
            self._start(replica)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for data in reversed(self.started):
            # Already down: removing its directory is what matters.
            with contextlib.suppress(Exception):
                self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        self.started.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def replay(self, paused: bool) -> None:
        """Pause or resume WAL replay on the replica."""
        engine = sa.create_engine(self.url(self.replica_port))
        try:
            with engine.connect() as conn:
                fn = sa.func.pg_wal_replay_pause if paused else sa.func.pg_wal_replay_resume
                conn.execute(sa.select(fn()))
        finally:
            engine.dispose()

    def lag_seconds(self, primary: sa.Engine) -> float | None:
        """The replica's replay lag as the primary reports it (None: none measured)."""
        with primary.connect() as conn:
            lag = conn.execute(
                sa.text("SELECT extract(epoch FROM replay_lag) FROM pg_stat_replication")
            ).scalar()
        return None if lag is None else float(lag)
