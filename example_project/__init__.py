"""The seed's social app: users, follows and posts with three counter caches on ``users``.

``python -m example_project seed|profile|demo`` loads data, compares profile
reads and runs the whole migrate-seed-backfill story (see docs/README.md).
"""
