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
    """One ``name==floor`` line per dependency (extras' too) with a ``>=`` floor.

    Constraints take no extras, and a package named twice keeps its highest floor.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps.extend(extra)
    floors: dict[str, str] = {}
    for m in filter(None, map(_FLOOR.match, deps)):
        name, floor = m.group(1).lower(), m.group(3)
        if name not in floors or _version(floor) > _version(floors[name]):
            floors[name] = floor
    return [f"{name}=={floor}" for name, floor in floors.items()]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(pins(root / "pyproject.toml")))
