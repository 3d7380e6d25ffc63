"""Planted-bug check: apply each mutation of tests/mutants.py, run the tests that must catch it.

Run by hand, in CI-like conditions (services up, ``CI=true``)::

    COUNTERFILL_TEST_REDIS=redis://127.0.0.1:6379 .venv/bin/python bench/mutation_check.py [NAME...]

For each mutation the same tests first run unmutated (they must pass), then
with the mutation; it is *caught* when that run fails. Prints one line per
mutation and exits 1 when any mutation survived (or could not be judged).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "mutants"]

#: mutation name -> the pytest arguments (files, ``-k``) whose tests must catch it.
PLAN: dict[str, list[str]] = {
    "no_for_update": ["tests/test_races.py", "tests/test_backfill_batch.py"],
    "old_state_from_session": [
        "tests/test_races.py",
        "tests/test_live_hypothesis.py",
        "-k",
        "races or sqlite",
    ],
    "no_parent_prelock": ["tests/test_live_concurrency.py", "tests/test_bulk_concurrency.py"],
    "bulk_unlocked_pre_read": ["tests/test_races.py", "tests/test_bulk_concurrency.py"],
    "ignore_value_columns": ["tests/test_live_hypothesis.py", "-k", "sqlite"],
    "redact_nothing": ["tests/test_secrets.py"],
}


def run(tests: list[str], mutation: str | None) -> tuple[bool, float, str]:
    """Run ``tests`` (with ``mutation`` applied); return (passed, seconds, last line)."""
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT / "tests")}
    env.pop("COUNTERFILL_MUTATION", None)
    if mutation:
        env["COUNTERFILL_MUTATION"] = mutation
    start = time.monotonic()
    proc = subprocess.run(
        [*PYTEST, *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return proc.returncode == 0, time.monotonic() - start, lines[-1] if lines else proc.stderr


def main(names: list[str]) -> int:
    chosen = names or list(PLAN)
    baseline: dict[tuple[str, ...], bool] = {}
    survived = 0
    for name in chosen:
        args = tuple(PLAN[name])
        if args not in baseline:  # the same tests, unmutated, must pass first
            ok, seconds, last = run(list(args), None)
            baseline[args] = ok
            print(f"baseline {' '.join(args)}: {'passed' if ok else 'FAILED'} ({seconds:.0f}s)")
        if not baseline[args]:
            print(f"{name}: not judged (its tests fail without the mutation)")
            survived += 1
            continue
        passed, seconds, last = run(list(args), name)
        survived += passed
        verdict = "SURVIVED" if passed else "caught"
        print(f"{name}: {verdict} ({seconds:.0f}s) by {' '.join(args)}: {last}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
