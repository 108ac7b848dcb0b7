"""A submission's recipients: `Recipient`, what every door gives the submission path,
and `RecipientImports`, those of one SMTP transaction, imported as contacts at RCPT
time (S-7).

A RCPT's 250 does not wait for its import: the import is held for a moment, so
that when the DATA follows at once the contacts and the message are committed
in one transaction, and the client waits for one commit instead of two in a
row. Whatever the submission has not taken by then is committed on its own:
when the hold ends, and at once on RSET, EHLO, QUIT or a lost
connection, so a recipient whose DATA never comes is still kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailgw.randomness import random_hex
from mailgw.store.contacts import ImportedRecipient, RecipientImport
from mailgw.store.submissions import QueuedRecipient
from mailgw.submit.addresses import delivery_address, normalize_address
from mailgw.submit.errors import lower_refusals_translated

# How long a RCPT's import waits for its message. Nobody waits on it meanwhile
# (QUIT and RSET commit it at once); long enough for a client that does not
# pipeline to send DATA and its text over a slow link.
IMPORT_HOLD_SECONDS = 0.25

# How a recipient is sent the message (the deliveries' kind): SMTP's RCPTs are all
# "to"; the HTTP dialects have copies and blind copies.
RecipientKind = Literal["to", "cc", "bcc"]


def submission_group_name(origin: str) -> str:
    """The name of the contact group made for one submission (S-7): its door, its time
    and a random part (`SMTP 2026-05-04 10:11:12 9f3a01bc`, `API ...`)."""
    return f"{origin.upper()} {datetime.now(UTC):%Y-%m-%d %H:%M:%S} {random_hex(4)}"


@dataclass(frozen=True)
class Recipient:
    email: str  # normalized (addresses.normalize_address): the contact's key
    kind: RecipientKind = "to"
    # As delivered (addresses.delivery_address): the local part as written, the domain
    # lowercased; None: `email`.
    address: str | None = None

    @classmethod
    def parse(cls, address: str, kind: RecipientKind = "to") -> Recipient:
        """The recipient `address` names; InvalidAddress if it is none."""
        email = normalize_address(address)
        return cls(email, kind, delivery_address(address, email))

    @property
    def delivered_to(self) -> str:
        return self.address or self.email


class RecipientImports:
    log = Logger()

    def __init__(self, request: Callable[[Recipient], RecipientImport],
                 commit: Callable[[RecipientImport], defer.Deferred[ImportedRecipient]],
                 clock, hold_seconds: float = IMPORT_HOLD_SECONDS) -> None:
        """`request(recipient)` makes the import of one recipient (raising
        DatabaseUnavailable when it could not be committed); `commit(request)` commits
        it on its own and fires with the result."""
        self._request = request
        self._commit = commit
        self._clock = clock
        self._hold_seconds = hold_seconds
        self._held: list[RecipientImport] = []
        self._committing: list[tuple[RecipientImport, defer.Deferred[ImportedRecipient]]] = []
        self._timer = None

    def __len__(self) -> int:
        return len(self._held) + len(self._committing)

    def add(self, recipient: Recipient) -> None:
        """Hold the recipient's import until the submission takes it or the hold ends."""
        self._held.append(self._request(recipient))
        if self._timer is None:
            self._timer = self._clock.callLater(self._hold_seconds, self.flush)

    async def add_now(self, recipient: Recipient) -> None:
        """Import the recipient and wait for its commit: when the reply depends on it, as
        for an account's contact limit (S-15: ContactQuotaExhausted). Nothing is kept if
        the import fails."""
        request = self._request(recipient)
        with lower_refusals_translated():
            imported = await self._commit(request)
        self._committing.append((request, defer.succeed(imported)))

    def take(self) -> list[RecipientImport] | None:
        """Every import, for the submission to commit with itself; None when some are
        already committing on their own (the rest go too)."""
        if self._committing:
            self.flush()
            return None
        held, self._held = self._held, []
        self._cancel_timer()
        return held

    def flush(self) -> None:
        """Commit the held imports on their own."""
        self._cancel_timer()
        held, self._held = self._held, []
        self._committing.extend((request, self._commit(request)) for request in held)

    def close(self) -> None:
        """The transaction is over without a message: commit what is held, and log the
        imports that fail, since nobody waits for them."""
        self.flush()
        for _, pending in self._committing:
            pending.addErrback(self._failed)

    async def settled(self) -> None:
        """Fires once every import is committed or has failed (logged): a QUIT waits for
        this before closing, so that the client finds its contacts stored."""
        try:
            await self.imported()
        except Exception:
            self._failed(Failure())

    async def imported(self) -> tuple[list[QueuedRecipient], int | None]:
        """The recipients once every import is committed, and their group; the first
        failure is raised after all have finished, so none is left unhandled."""
        self.flush()
        results = await defer.DeferredList([pending for _, pending in self._committing],
                                           consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()
        recipients = [QueuedRecipient.imported(request, imported)
                      for (request, _), (_, imported) in zip(self._committing, results,
                                                             strict=True)]
        return recipients, results[-1][1].group_id if results else None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _failed(self, failure: Failure) -> None:
        self.log.warn("recipient import not committed: {error}",
                      error=failure.getErrorMessage())
