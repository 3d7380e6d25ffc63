"""Planning on any orderable single-column key, one run from concurrent enqueues, race-free DDL.

Parents keyed by dates, timestamps, strings and decimals are cut into several
batches and backfilled; the result is judged with a hand-written COUNT. On
SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import datetime as dt
import decimal
import subprocess
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from backfill_project import BIN, Project, run_rows, seed
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, mapped_column

from alembic_counterfill import counter_cache, counters_of, planning, progress
from alembic_counterfill.errors import CounterfillError
from alembic_counterfill.runner import run_inline


class KeyBase(DeclarativeBase):
    pass


KEYS = {
    "date": (sa.Date(), lambda i: dt.date(2024, 1, 1) + dt.timedelta(days=i * 3)),
    "stamp": (
        # Microseconds kept on MariaDB too (its DATETIME drops them by default).
        sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
        lambda i: dt.datetime(2024, 1, 1, 8) + dt.timedelta(hours=i * 5, microseconds=i),
    ),
    "text": (sa.String(20), lambda i: f"k{i * 7919 % 1000:04d}"),
    "dec": (sa.Numeric(10, 2), lambda i: decimal.Decimal(i * 37) / 4),
    # MariaDB cannot index a BLOB without a prefix length: a VARBINARY there,
    # still bytes to planning, which must refuse it all the same.
    "blob": (
        sa.LargeBinary(16).with_variant(mysql.VARBINARY(16), "mysql", "mariadb"),
        lambda i: bytes([i]),
    ),
}
# All classes first, then resolution: a counter's target must exist when mappers configure.
# (Kept in CLASSES: the registry holds mapped classes weakly.)
CLASSES: list[type] = []
for _name, (_type, _) in KEYS.items():
    CLASSES.append(
        type(
            f"{_name.title()}Parent",
            (KeyBase,),
            {
                "__tablename__": f"{_name}_parents",
                "id": mapped_column(_type, primary_key=True),
                "kids_count": counter_cache(f"{_name.title()}Kid.parent_id"),
            },
        )
    )
for _name, (_type, _) in KEYS.items():
    CLASSES.append(
        type(
            f"{_name.title()}Kid",
            (KeyBase,),
            {
                "__tablename__": f"{_name}_kids",
                "id": mapped_column(sa.Integer, primary_key=True),
                "parent_id": mapped_column(_type, sa.ForeignKey(f"{_name}_parents.id")),
            },
        )
    )


def _create(engine: sa.Engine, name: str) -> None:
    """Create only the parent and child tables of key type ``name`` (DDL is slow on MariaDB)."""
    tables = [KeyBase.metadata.tables[f"{name}_{kind}"] for kind in ("parents", "kids")]
    KeyBase.metadata.create_all(engine, tables=tables)


def _fill(engine: sa.Engine, name: str, parents: int = 23) -> None:
    make = KEYS[name][1]
    parent_t, kid_t = (
        KeyBase.metadata.tables[f"{name}_parents"],
        KeyBase.metadata.tables[f"{name}_kids"],
    )
    with engine.begin() as conn:
        conn.execute(
            sa.insert(parent_t), [{"id": make(i), "kids_count": 9} for i in range(parents)]
        )
        conn.execute(
            sa.insert(kid_t), [{"parent_id": make(i % parents)} for i in range(parents * 3 + 5)]
        )


@pytest.mark.parametrize("name", ["date", "stamp", "text", "dec"])
def test_backfill_plans_and_runs_on_each_orderable_key_type(engine: sa.Engine, name: str) -> None:
    _create(engine, name)
    _fill(engine, name)
    counters = {c.key: c for c in counters_of(KeyBase)}
    counter = counters[f"{name}_parents.kids_count"]
    with engine.begin() as conn:
        plan = planning.plan(conn, [counter], 4)
    assert len(plan.batch_ids) == 6  # 23 parents, 4 per batch
    outcomes = run_inline(engine, counters, plan.batch_ids)
    assert len(outcomes) == 6 and all(o.applied for o in outcomes)
    (run,) = run_rows(engine)
    assert run["state"] == progress.DONE and run["batches_failed"] == 0
    parents, kids = f"{name}_parents", f"{name}_kids"
    truth = sa.text(
        f"SELECT p.id, p.kids_count, (SELECT count(*) FROM {kids} k WHERE k.parent_id = p.id) "  # noqa: S608
        f"FROM {parents} p"
    )
    with engine.connect() as conn:
        rows = conn.execute(truth).all()
    assert len(rows) == 23
    assert [r for r in rows if r[1] != r[2]] == []


def test_a_key_that_cannot_be_cut_into_ranges_is_refused_at_enqueue(engine: sa.Engine) -> None:
    _create(engine, "blob")
    counter = next(c for c in counters_of(KeyBase) if c.key == "blob_parents.kids_count")
    with engine.begin() as conn, pytest.raises(CounterfillError) as caught:
        planning.plan(conn, [counter], 4)
    message = str(caught.value)
    assert message.startswith("cannot backfill blob_parents.kids_count: primary key")
    assert "give blob_parents an integer, string, decimal, date/time or UUID primary key" in message
    with engine.connect() as conn:
        assert not progress.has_tables(conn)  # refused before anything was written


def test_concurrent_enqueue_on_sqlite_plans_one_run(tmp_path: Path, redis_url: str) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url)
    seed(engine, users=3000)
    project = Project(tmp_path / "p", url, broker_url=redis_url, batch_size=10)
    args = [str(BIN / "alembic-counterfill"), "-c", project.ini, "enqueue"]
    procs = [
        subprocess.Popen(
            args, env=project.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    runs = run_rows(engine)
    assert len(runs) == 1, [dict(r) for r in runs]
    assert sum("planned run" in out for out, _ in outputs) == 1
    engine.dispose()


def test_creating_the_bookkeeping_tables_is_race_free(engine: sa.Engine) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        try:
            barrier.wait()
            with engine.begin() as conn:
                progress.ensure_tables(conn)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engine.connect() as conn:
        assert progress.has_tables(conn)
        names = set(sa.inspect(conn).get_table_names())
    assert {"counterfill_counters", "counterfill_runs", "counterfill_batches"} <= names
