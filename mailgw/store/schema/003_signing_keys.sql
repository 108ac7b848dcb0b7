-- Secrets every node of one installation shares, e.g. the key that signs tracking
-- links and bounce addresses (T-2, D-2): created once, read at start-up.
CREATE TABLE signing_keys (
    name       text PRIMARY KEY,
    secret     bytea NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
