"""Exceptions shared across mailgw's layers."""


class StartupError(Exception):
    """mailgw cannot start; the message is the one line shown to the operator."""


class TransientDatabaseError(Exception):
    """A transaction that may succeed if tried again: it lost a deadlock or a
    serialization conflict, or waited too long for a lock (psycopg2's error is its
    __cause__); or, as DatabaseUnavailable, PostgreSQL is out of reach for now."""


class DatabaseUnavailable(TransientDatabaseError):
    """PostgreSQL cannot be reached now: SMTP answers 451, HTTP 503 (R-2)."""


class AlreadyExists(Exception):
    """A unique name (account, user, domain, sender...) is taken."""


class NotFound(Exception):
    """A named object (account, domain, sender...) does not exist."""
