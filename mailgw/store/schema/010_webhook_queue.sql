-- mailgw schema, migration 010: the webhook feed (W-1, W-2).
--
-- Every statement that writes events also notes, in the same transaction, the events
-- that some active endpoint of their account may want: a statement-level trigger
-- fills webhook_outbox, so no writer of events (group-committed batches, tracking,
-- inbound, the APIs) needs to know about webhooks, and no event is lost between its
-- commit and its webhook. The feed (mailgw/store/webhook_queue.py) takes outbox rows
-- with SKIP LOCKED, turns each into one webhook_deliveries row per endpoint that wants
-- it, and deletes them, in one transaction: several nodes share the work, a crash
-- loses nothing.
CREATE TABLE webhook_outbox (
    event_id bigint PRIMARY KEY
);

-- The W-1 name of an event type, when it differs (a hard or soft bounce is "bounce";
-- the payload decides which it posts; a reactivated subscription is "unsubscribed",
-- as Aldeamo sends it).
CREATE FUNCTION webhook_name(event_type text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE event_type WHEN 'bounced' THEN 'bounce'
                           WHEN 'resubscribed' THEN 'unsubscribed'
                           ELSE event_type END;

-- Machines' opens and clicks (T-6) are not a person's: no webhook.
CREATE FUNCTION webhook_outbox_feed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_outbox (event_id)
    SELECT e.id FROM new_events e
    WHERE NOT e.machine AND EXISTS (
        SELECT 1 FROM webhook_endpoints w
        WHERE w.account_id = e.account_id AND w.active
          AND w.event_types && ARRAY[e.type, webhook_name(e.type)]);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_webhook_outbox AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_outbox_feed();

-- The queue cap (W-2) keeps an endpoint's newest pending rows: found from the newest
-- down, by id.
CREATE INDEX webhook_deliveries_pending_id_idx ON webhook_deliveries (endpoint_id, id)
    WHERE state = 'pending';

-- Posts given up are kept a week for the operator (their last error), then deleted.
CREATE INDEX webhook_deliveries_failed_idx ON webhook_deliveries (last_attempt_at)
    WHERE state = 'failed';
