"""Several writers on one SQLite file stay exact: old state is read under SQLite's write lock."""

from __future__ import annotations

import multiprocessing
import random
import threading

import pytest
import sqlalchemy as sa
from pin_models import Base, Board, Pin, drift
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

THREADS = 4
OPS = 150
BOARDS = 4


def _writer(engine: sa.Engine, seed: int, bulk: bool, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(OPS):
            with Session(engine) as s:
                op = rng.random()
                if op < 0.3:
                    s.add(Pin(board_id=rng.randint(1, BOARDS), likes=rng.randint(0, 3)))
                else:
                    ids = s.scalars(sa.select(Pin.id)).all()
                    if not ids:
                        continue
                    if bulk:  # ORM bulk statements read old state too
                        pid = rng.choice(ids)
                        if op < 0.7:
                            stmt = sa.update(Pin).where(Pin.id == pid)
                            s.execute(stmt.values(board_id=rng.randint(1, BOARDS)))
                        else:
                            s.execute(sa.delete(Pin).where(Pin.id == pid))
                        s.commit()
                        continue
                    pin = s.get(Pin, rng.choice(ids))
                    if pin is None:  # deleted by another writer meanwhile
                        continue
                    if op < 0.7:
                        pin.board_id = rng.randint(1, BOARDS)  # a move, decided on a stale read
                    elif op < 0.85:
                        pin.likes = rng.randint(0, 3)
                    else:
                        s.delete(pin)
                try:
                    s.commit()
                except StaleDataError:  # another writer deleted the row first: a lost race
                    s.rollback()
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.parametrize("bulk", [False, True], ids=["flushes", "bulk-statements"])
# A delete of a row another writer deleted first: SQLAlchemy warns, nothing to count.
@pytest.mark.filterwarnings("ignore:DELETE statement on table 'pins' expected to delete")
def test_four_threads_on_one_file_stay_exact(tmp_path, bulk: bool) -> None:  # noqa: ANN001
    # A generous busy timeout: writers queue for the lock instead of failing.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'writers.db'}", connect_args={"timeout": 60})
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Board(id=i) for i in range(1, BOARDS + 1)])
        s.add_all([Pin(board_id=1 + i % BOARDS, likes=i % 3) for i in range(40)])
        s.commit()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_writer, args=(engine, seed, bulk, errors))
        for seed in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM pins")).scalar_one() > 0
    assert drift(engine) == {}
    engine.dispose()


def _process_writer(url: str, seed: int) -> None:
    engine = sa.create_engine(url, connect_args={"timeout": 60})
    errors: list[BaseException] = []
    _writer(engine, seed, False, errors)
    engine.dispose()
    if errors:
        raise SystemExit(f"writer {seed}: {errors[0]!r}")


def test_four_processes_on_one_file_stay_exact(tmp_path) -> None:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'writers.db'}"
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Board(id=i) for i in range(1, BOARDS + 1)])
        s.add_all([Pin(board_id=1 + i % BOARDS, likes=i % 3) for i in range(40)])
        s.commit()
    engine.dispose()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited connections
    procs = [ctx.Process(target=_process_writer, args=(url, seed)) for seed in range(THREADS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * THREADS
    engine = sa.create_engine(url)
    assert drift(engine) == {}
    engine.dispose()
