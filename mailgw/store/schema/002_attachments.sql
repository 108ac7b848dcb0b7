-- Attachments stored for download links (S-8 attachments = "links", Teenvio):
-- the message carries a link /a/<token> instead of the file.
CREATE TABLE attachments (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    message_id   bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    token        text NOT NULL UNIQUE,
    filename     text NOT NULL,
    content_type text NOT NULL,
    data         bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX attachments_message_id_idx ON attachments (message_id);

-- S-15 monthly quota: count an account's queued recipients since the month began.
CREATE INDEX deliveries_account_created_idx ON deliveries (account_id, created_at);
