"""Print pip requirements pinning each dependency to the lowest version pyproject.toml allows.

``make test-oldest`` installs these into a second virtualenv, so the floors
pyproject declares are the versions CI actually runs.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# "name[extras]>=1.2" (other clauses after a comma are ignored: the floor is what we test).
_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def pins(pyproject: Path) -> list[str]:
    """One ``name[extras]==floor`` line per dependency with a ``>=`` floor; others as written."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        m = _FLOOR.match(dep)
        out.append(f"{m.group(1)}{m.group(2) or ''}=={m.group(3)}" if m else dep)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(pins(root / "pyproject.toml")))
