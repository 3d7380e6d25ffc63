"""Alembic plugin entry point: registers the counter ops, the autogenerate comparator and CLI hook.

Alembic imports this module (through the ``alembic.plugins`` entry point) on
every ``import alembic``, in the middle of importing its own autogenerate
package. So it stays light: no Dramatiq, no user models, nothing from
``alembic.autogenerate`` at import time; the heavier pieces load when alembic
actually compares, renders or builds its command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alembic.runtime.plugins import Plugin

#: The name users put in ``autogenerate_plugins=[...]`` (the entry point's name).
PLUGIN_NAME = "alembic_counterfill"


def setup(plugin: Plugin) -> None:
    """Register what the plugin provides; called by alembic with this plugin's :class:`Plugin`."""
    from alembic.util import DispatchPriority

    # alembic.operations is fully imported before plugins load, so the ops
    # (op.request_counter_backfill and its reverse) can register right away:
    # migration scripts never import this package themselves.
    from . import ops  # noqa: F401

    # FIRST: before alembic reflects tables, so ours are not even looked at;
    # LAST: after alembic's own comparison has filled upgrade_ops.
    plugin.add_autogenerate_comparator(
        _hide, "schema", "counterfill", priority=DispatchPriority.FIRST
    )
    plugin.add_autogenerate_comparator(
        _compare, "schema", "counterfill", priority=DispatchPriority.LAST
    )

    from . import alembic_cli

    alembic_cli.install()


def _hide(autogen_context: Any, upgrade_ops: Any, schemas: Any) -> Any:
    # Imported on first use: alembic.autogenerate is half-imported at setup().
    from . import autogen

    return autogen.hide_bookkeeping(autogen_context, upgrade_ops, schemas)


def _compare(autogen_context: Any, upgrade_ops: Any, schemas: Any) -> Any:
    from . import autogen

    return autogen.compare(autogen_context, upgrade_ops, schemas)
