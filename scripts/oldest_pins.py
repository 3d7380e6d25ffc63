"""Print pip constraints pinning each dependency to the lowest version pyproject.toml allows.

``make test-oldest`` installs the package under these constraints into a
second virtualenv, so the floors pyproject declares are versions CI runs.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# "name[extras]>=1.2" (other clauses after a comma are ignored: the floor is what we test).
_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def pins(pyproject: Path) -> list[str]:
    """One ``name==floor`` line per dependency with a ``>=`` floor (constraints take no extras)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [f"{m.group(1)}=={m.group(3)}" for m in map(_FLOOR.match, deps) if m]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(pins(root / "pyproject.toml")))
