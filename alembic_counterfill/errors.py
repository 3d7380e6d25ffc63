"""The library's exceptions: one root, each message saying how to fix the problem."""

from __future__ import annotations


class CounterfillError(Exception):
    """Root of every error raised by alembic_counterfill.

    The CLI turns any of these into a one-line message and a non-zero exit
    status; library callers can catch this one class.
    """


class CounterDeclarationError(CounterfillError):
    """A ``counter_cache()`` declaration cannot be resolved against the models."""


class ConfigurationError(CounterfillError):
    """The ``[counterfill]`` configuration (or the alembic config) is unusable."""


class UnknownCounterError(CounterfillError):
    """A counter key given on the command line or to an API is not declared."""


class BrokerError(CounterfillError):
    """The Dramatiq broker cannot be reached or configured."""


class DatabaseError(CounterfillError):
    """The database cannot be reached or lacks what the library needs."""


class DefinitionMismatch(CounterfillError):
    """A batch was planned under counter definitions other than this process's models'."""


class DuplicateKeyError(CounterfillError):
    """A new row's key exists already: the cause of an IntegrityError raised before the INSERT.

    On MariaDB/MySQL a flush reports it without waiting when the row appeared
    while the flush waited for its locks (see docs/databases.md).
    """


class ReinsertedRowError(CounterfillError):
    """A row a flush deletes or updates was re-inserted by another transaction while it ran.

    The flush's locking read found the row gone, and its DELETE or UPDATE then
    matched a row with the same key that another transaction inserted and
    committed meanwhile (docs/increment-logic.md, "Re-inserted rows"). The
    flush is stopped before its deltas and its transaction rolled back:
    nothing was written, and running the transaction again is safe.
    """


class CounterfillWarning(UserWarning):
    """Something a counter cannot see or will not honour (a database cascade, a counter assignment).

    Not an error: the application keeps running, and the message says what to
    change or which command repairs the counters.
    """
