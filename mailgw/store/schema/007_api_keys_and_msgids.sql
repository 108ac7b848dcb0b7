-- API key kinds (H-1, H-3) and the per-recipient msgid of HTTP sends (H-1, W-1).
--
-- account:  sends and reads statistics, events and DMDS;
-- admin:    also manages its account under /v1/admin/ (operator: every account);
-- campaign: sends for its campaign only (API_key_not_authorized elsewhere).
ALTER TABLE api_keys
    ADD COLUMN kind        text NOT NULL DEFAULT 'account'
                           CHECK (kind IN ('account', 'admin', 'campaign')),
    ADD COLUMN campaign_id bigint REFERENCES campaigns (id) ON DELETE CASCADE,
    -- An installation's operator: an admin key that manages every account (H-3).
    ADD COLUMN operator    boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT api_keys_campaign_kind CHECK ((kind = 'campaign') = (campaign_id IS NOT NULL)),
    ADD CONSTRAINT api_keys_operator_admin CHECK (NOT operator OR kind = 'admin');

-- The msgid `POST /v1/email` answered for each recipient, which the webhooks send back
-- (W-1); NULL for deliveries of other doors (SMTP answers the message's own id).
ALTER TABLE deliveries ADD COLUMN msgid uuid;
CREATE UNIQUE INDEX deliveries_msgid_uidx ON deliveries (msgid) WHERE msgid IS NOT NULL;
