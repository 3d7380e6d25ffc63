"""Wall-clock phases of one ``alembic-counterfill … enqueue --wait`` process (fixed costs).

Run in place of the console script, with the same arguments::

    COUNTERFILL_PHASES_T0=$(date +%s.%N) python bench/phases.py -c alembic.ini enqueue --all --wait

It stamps, with ``time.time()``: the process start (``COUNTERFILL_PHASES_T0``
from the launcher, else the interpreter's first line), the CLI imported, the
config read, the models imported, the first database connection, the plan
recorded, the messages sent, the wait loop entered and left, and the CLI's
return (``bench/backfill.py --phases`` adds the first piece started and the
last one finished from the workers' log, same clock on one machine). The
phases are printed to stderr as one line of JSON after ``phases:``,
offsets in seconds from the process start. Measuring only: the library's
functions are wrapped, never changed.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time
import types

T0 = float(os.environ.get("COUNTERFILL_PHASES_T0") or time.time())
INTERPRETER = time.time()
stamps: dict[str, float] = {"interpreter up": INTERPRETER}


def _stamp(name: str, *, once: bool = True) -> None:
    if once and name in stamps:
        return
    stamps[name] = time.time()


def _wrap(owner: object, attr: str, before: str | None, after: str | None) -> None:
    original = getattr(owner, attr)

    def wrapper(*args: object, **kwargs: object) -> object:
        if before:
            _stamp(before)
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                _stamp(after, once=False)

    setattr(owner, attr, wrapper)


#: module -> (attribute path, stamp before, stamp after), applied once the module is imported
#: (wrapping at import, so the probe imports nothing the command would not).
PATCHES: dict[str, list[tuple[str, str | None, str | None]]] = {
    "alembic_counterfill.cli": [("Launch.settings", None, "config read")],
    "alembic_counterfill.config": [("Settings.counters", None, "models imported")],
    "alembic_counterfill.planning": [("plan", "planning", "planned")],
    "alembic_counterfill.cli_backfill": [("_send", "sending", "sent")],
    "alembic_counterfill.monitor": [("wait", "waiting", "wait returned")],
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies PATCHES to a module right after it is executed."""

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            original(module)
            for dotted, before, after in PATCHES[name]:
                *owner_path, attr = dotted.split(".")
                owner: object = module
                for part in owner_path:
                    owner = getattr(owner, part)
                _wrap(owner, attr, before, after)
            if name == "alembic_counterfill.cli":
                _stamp("cli imported")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install() -> None:
    sys.meta_path.insert(0, _AfterImport())

    import sqlalchemy as sa  # the CLI imports it first thing anyway

    @sa.event.listens_for(sa.engine.Engine, "connect")
    def _connected(*_: object) -> None:
        _stamp("first connection")


def main() -> None:
    _install()
    from alembic_counterfill import cli

    code = 0
    try:
        sys.argv[0] = "alembic-counterfill"
        cli.main()  # the console script's own entry point
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception:
        code = 1
        raise
    finally:
        _stamp("cli returned")
        import json

        ordered = sorted(stamps.items(), key=lambda kv: kv[1])
        print(
            "phases: " + json.dumps({k: round(v - T0, 3) for k, v in ordered}),
            file=sys.stderr,
        )
    sys.exit(code)


if __name__ == "__main__":
    main()
