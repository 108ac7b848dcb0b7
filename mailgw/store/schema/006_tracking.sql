-- Tracking (T-6) and statistics (H-4).

-- T-6: opens fetched by mail privacy proxies and clicks made by link scanners are
-- recorded with machine = true and counted apart from people's. A column, not a key of
-- details, so that a send's counters come from an index alone. A constant default
-- adds the column without rewriting the table.
ALTER TABLE events ADD COLUMN machine boolean NOT NULL DEFAULT false;

-- H-4: every counter of a send from one index-only scan (the unique opens and clicks
-- are distinct delivery ids). It starts with send_id, so it serves what the index it
-- replaces served.
CREATE INDEX events_send_type_idx ON events (send_id, type, machine, delivery_id)
    WHERE send_id IS NOT NULL;
DROP INDEX events_send_id_idx;

-- H-4: an account's counters per day, from the index too.
CREATE INDEX events_account_occurred_counters_idx ON events (account_id, occurred_at)
    INCLUDE (type, machine, delivery_id);
DROP INDEX events_account_occurred_idx;

-- H-4: deliveries deferred now, of a send (its messages) or of an account.
CREATE INDEX deliveries_deferred_idx ON deliveries (message_id) WHERE state = 'deferred';
