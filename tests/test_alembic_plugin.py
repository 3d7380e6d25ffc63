"""The ``alembic.plugins`` entry point: light to import, and the ``counterfill`` CLI hook."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
from alembic.config import CommandLine

from alembic_counterfill import alembic_cli


def test_import_alembic_loads_the_plugin_without_dramatiq_or_user_models() -> None:
    code = textwrap.dedent(
        """
        import sys
        import alembic
        from alembic.runtime import plugins
        from alembic.operations import Operations
        assert "alembic_counterfill" in plugins._all_plugins, plugins._all_plugins
        assert hasattr(Operations, "request_counter_backfill")
        heavy = [m for m in ("dramatiq", "redis", "pika", "alembic_counterfill.cli",
                             "alembic_counterfill.autogen", "click") if m in sys.modules]
        print(heavy)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_counterfill_subparser_hands_every_remaining_argument_to_click() -> None:
    options = CommandLine().parser.parse_args(
        ["-c", "other.ini", "-x", "a=1", "counterfill", "status", "--help", "-x", "b", "--json"]
    )
    assert options.config == ["other.ini"]
    assert options.x == ["a=1"]
    assert options.counterfill_args == ["status", "--help", "-x", "b", "--json"]
    fn, positional, kwargs = options.cmd
    assert fn is alembic_cli.counterfill
    assert positional == [] and kwargs == []


def test_alembic_help_lists_counterfill() -> None:
    help_text = CommandLine().parser.format_help()
    assert "counterfill" in help_text
    assert "Counter cache backfills" in help_text


def test_changed_alembic_internals_degrade_to_a_warning() -> None:
    class NoArgsBuilder:
        pass

    module = types.ModuleType("fake_alembic_config")
    module.CommandLine = NoArgsBuilder  # type: ignore[attr-defined]
    with pytest.warns(RuntimeWarning, match="use the 'alembic-counterfill' command instead"):
        alembic_cli._hook(module)


def test_a_failing_subparser_hook_warns_and_leaves_alembic_working() -> None:
    class NoSubparsers:
        def __init__(self) -> None:
            self._generate_args(None)

        def _generate_args(self, prog: str | None) -> None:
            self.built = True  # no self.subparsers: internals "changed"

    module = types.ModuleType("fake_alembic_config")
    module.CommandLine = NoSubparsers  # type: ignore[attr-defined]
    alembic_cli._hook(module)
    with pytest.warns(RuntimeWarning, match="alembic-counterfill"):
        built = NoSubparsers()
    assert built.built


def test_hook_runs_once_after_the_target_module_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cf_probe_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []
    finder = alembic_cli._AfterImport("cf_probe_module", lambda m: seen.append(m.VALUE))
    sys.meta_path.insert(0, finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            import cf_probe_module

        # The loader got its own exec_module back: nothing of the hook is left.
        assert "exec_module" not in vars(cf_probe_module.__loader__)
    finally:
        sys.modules.pop("cf_probe_module", None)
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
    assert seen == [42]
    assert finder not in sys.meta_path
