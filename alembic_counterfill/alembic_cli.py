"""Add ``counterfill`` to the stock ``alembic`` command line.

Why this module exists: alembic (1.20.1) has no public hook for third-party
CLI subcommands; ``CommandLine.register_command`` only helps programs that
build their own ``CommandLine``. What alembic does offer is that every
``alembic.plugins`` entry point is imported whenever alembic is. So this
module waits until ``alembic.config`` has been imported, then wraps
``CommandLine._generate_args`` so that each new command line gets one more
subparser, ``counterfill``, which hands all remaining arguments (``--help``
included) to our click group and receives alembic's ``Config`` (so ``-c``,
``-n``, ``-x`` and ``--raiseerr`` apply).

This leans on alembic internals (``_generate_args``, ``subparsers``, the
``cmd`` default read by ``run_cmd``). If they change, the hook degrades to a
warning pointing to ``alembic-counterfill``, the same click group installed
as a console script.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

COMMAND = "counterfill"
HELP = "Counter cache backfills (alembic_counterfill): list, status, enqueue, verify."
_TARGET = "alembic.config"
_MARK = "_counterfill_hooked"


def install() -> None:
    """Hook ``alembic.config`` now if it is already imported, else right after it is."""
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "CommandLine"):
        _hook(module)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_TARGET, _hook))


class _AfterImport(MetaPathFinder):
    """Run ``callback(module)`` once ``name`` has been executed by its normal loader."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        loader: Any = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec
        callback = self.callback

        def exec_then_hook(module: ModuleType) -> None:
            if module.__name__ != fullname:  # a loader shared by several modules (zipimport)
                exec_module(module)
                return
            del loader.exec_module  # back to the loader's own method, for good
            exec_module(module)
            callback(module)

        # Patch this loader instance only, so that the module keeps its real loader object.
        loader.exec_module = exec_then_hook
        return spec


def _hook(module: ModuleType) -> None:
    command_line = getattr(module, "CommandLine", None)
    generate = getattr(command_line, "_generate_args", None)
    if command_line is None or generate is None:
        _warn("alembic.config.CommandLine._generate_args is gone")
        return
    if getattr(generate, _MARK, False):
        return

    def _generate_args(self: Any, prog: str | None) -> None:
        generate(self, prog)
        try:
            _add_subcommand(self.subparsers)
        except Exception as exc:  # alembic internals changed: degrade, never break alembic
            _warn(f"{type(exc).__name__}: {exc}")

    setattr(_generate_args, _MARK, True)
    command_line._generate_args = _generate_args


def _add_subcommand(subparsers: Any) -> None:
    parser = subparsers.add_parser(COMMAND, help=HELP, add_help=False)
    # run_cmd() calls fn(config, *positional, **kwargs) with positional = kwargs = [].
    cmd: tuple[Callable[..., None], list[str], list[str]] = (counterfill, [], [])

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Everything after "counterfill" belongs to click, untouched: options, --help, all.
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.cmd = cmd
        namespace.counterfill_args = list(args or [])
        return namespace, []

    parser.parse_known_args = parse_known_args


def counterfill(config: Any) -> None:
    """Run ``alembic counterfill ...`` with the ``Config`` alembic built from its options."""
    from .cli import run_from_alembic

    run_from_alembic(config, list(getattr(config.cmd_opts, "counterfill_args", [])))


def _warn(reason: str) -> None:
    warnings.warn(
        f"alembic_counterfill could not add 'alembic {COMMAND}' to this alembic version "
        f"({reason}); use the 'alembic-counterfill' command instead",
        RuntimeWarning,
        stacklevel=2,
    )
