"""The event log (E-1): the one list of event types.

Everything that happens to a message after it is submitted is a row in `events`,
which the statistics, the API views and the webhooks read. The hot batch
statements of the submissions and the delivery queue write their events inside
their own statement (one statement per batch), with the types taken from
`EventType`.
"""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    """Every type of event; the CHECK of `events.type` lists the same (a test compares
    them). Each line says what the event means, who writes it and its `details`."""

    # A recipient's copy entered the delivery queue (S-12). SubmissionStore.
    QUEUED = "queued"
    # The recipient's MX accepted it (D-5); details: reply. QueueStore.
    SENT = "sent"
    # A 4xx or connection trouble; it is retried (D-5); details: reply. QueueStore.
    DEFERRED = "deferred"
    # A 5xx, or retried past the maximum age (D-5); details: type (hard or soft),
    # reply. QueueStore; later also the inbound DSNs (D-7).
    BOUNCED = "bounced"
    # Not sent to a suppressed or invalid recipient, or a deleted message (D-6);
    # details: reason. SubmissionStore at submission, QueueStore at delivery.
    NOT_SENT = "not_sent"
    # The open pixel was fetched (T-1). The tracking endpoints.
    OPEN = "open"
    # A tracked link was followed (T-2). The tracking endpoints.
    CLICK = "click"
    # The recipient unsubscribed (T-3). The tracking endpoints.
    UNSUBSCRIBED = "unsubscribed"
    # A contact was subscribed again (H-2). The APIs.
    RESUBSCRIBED = "resubscribed"
    # A complaint (ARF) arrived (D-7). The inbound processing.
    COMPLAINT = "complaint"
    # A contact reached the hard-bounce limit and is no longer sent to (D-7);
    # details: reason. QueueStore.
    INVALIDATED = "invalidated"
    # An invalid contact was made valid again (H-2). The APIs.
    REVALIDATED = "revalidated"
