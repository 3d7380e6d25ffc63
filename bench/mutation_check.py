"""Planted-bug check: apply each mutation of tests/mutants.py, run the tests that must catch it.

Run by hand, in CI-like conditions (services up, ``CI=true``)::

    COUNTERFILL_TEST_REDIS=redis://127.0.0.1:6379 .venv/bin/python bench/mutation_check.py [NAME...]

For each mutation, each group of tests that should catch it first runs
unmutated (it must pass), then with the mutation; the group *caught* it when
that run fails. Prints one line per group and per mutation, and exits 1 when a
mutation survived every group (or none could be judged).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "mutants"]

#: mutation name -> groups of pytest arguments (files, ``-k``); each group is judged
#: on its own, so the report says which tests catch which bug.
PLAN: dict[str, list[list[str]]] = {
    "no_for_update": [["tests/test_races.py"], ["tests/test_backfill_batch.py"]],
    "old_state_from_session": [
        ["tests/test_races.py"],
        ["tests/test_live_hypothesis.py", "-k", "random_orm and sqlite"],
    ],
    "no_parent_prelock": [
        ["tests/test_races.py", "-k", "key_order"],
        ["tests/test_live_concurrency.py", "tests/test_bulk_concurrency.py"],
    ],
    "bulk_unlocked_pre_read": [["tests/test_races.py"], ["tests/test_bulk_concurrency.py"]],
    "ignore_value_columns": [["tests/test_live_hypothesis.py", "-k", "random_orm and sqlite"]],
    "redact_nothing": [["tests/test_secrets.py"]],
}


def run(tests: list[str], mutation: str | None) -> tuple[bool, float, str]:
    """Run ``tests`` (with ``mutation`` applied); return (passed, seconds, last line)."""
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT / "tests")}
    env.pop("COUNTERFILL_MUTATION", None)
    if mutation:
        env["COUNTERFILL_MUTATION"] = mutation
        # The first failure is the verdict: shrinking a state machine's failing
        # example under a planted bug can outlast the test's timeout.
        env["HYPOTHESIS_PROFILE"] = "quick"
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
        caught_by = []
        for group in PLAN[name]:
            args = tuple(group)
            if args not in baseline:  # the same tests, unmutated, must pass first
                ok, seconds, last = run(list(args), None)
                baseline[args] = ok
                print(f"baseline {' '.join(args)}: {'passed' if ok else 'FAILED'} ({seconds:.0f}s)")
            if not baseline[args]:
                print(f"{name}: {' '.join(args)} not judged (fails without the mutation)")
                continue
            passed, seconds, last = run(list(args), name)
            verdict = "survived" if passed else "caught"
            print(f"{name}: {verdict} by {' '.join(args)} ({seconds:.0f}s): {last}", flush=True)
            if not passed:
                caught_by.append(" ".join(args))
        survived += not caught_by
        print(f"{name}: {'caught' if caught_by else 'SURVIVED'}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
