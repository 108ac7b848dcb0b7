"""Exceptions shared across mailgw's layers."""


class StartupError(Exception):
    """mailgw cannot start; the message is the one line shown to the operator."""


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached now: SMTP answers 451, HTTP 503 (R-2)."""


class AlreadyExists(Exception):
    """A unique name (account, user, domain, sender...) is taken."""


class NotFound(Exception):
    """A named object (account, domain, sender...) does not exist."""
