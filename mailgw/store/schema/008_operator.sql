-- The header From the client wrote (display name aside, which is in the body), kept
-- when it is a verified sender of the account; NULL: the From is the envelope sender.
-- The DKIM key and the return-path domain are those of its domain (DMARC alignment).
ALTER TABLE messages ADD COLUMN from_address text;

-- Recipient domains whose delivery the operator suspended (O-7): their deliveries are
-- held, not attempted and not bounced, on every node, until resumed. A held delivery
-- waits with next_attempt_at = 'infinity', out of the claim's way: the suspension
-- parks the domain's waiting deliveries at once, and a claim parks any that comes due
-- later (a new message, a retry), in the same statement, without counting an attempt.
-- Resuming makes the domain's held deliveries due now.
CREATE TABLE suspended_domains (
    domain       text PRIMARY KEY CHECK (domain = lower(domain) AND domain <> ''),
    reason       text NOT NULL DEFAULT '',
    suspended_at timestamptz NOT NULL DEFAULT now()
);
