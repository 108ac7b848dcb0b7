-- The DMDS API (H-2): campaign keys that can be shown again, and saved filters.
--
-- A campaign's key (camp_apikey) is an API key of kind 'campaign': found by its digest
-- in api_keys, over HTTP and as the password of the SMTP login dmdsid-<numid>. The
-- campaign also keeps it sealed (XSalsa20-Poly1305, under the installation's secret
-- 'campaign_keys' in signing_keys), because campania_apikey/<numid> shows it again.
-- The digests campaigns kept before become campaign keys as they are (their logins
-- keep working; their key cannot be shown, a new one can be set).
ALTER TABLE campaigns
    ADD COLUMN api_key_id     bigint REFERENCES api_keys (id) ON DELETE SET NULL,
    ADD COLUMN api_key_sealed bytea;

WITH moved AS (
    INSERT INTO api_keys (account_id, name, key_hash, key_prefix, kind, campaign_id)
    SELECT account_id, 'camp_apikey', api_key_hash, '', 'campaign', id FROM campaigns
    WHERE api_key_hash ~ '^[0-9a-f]{64}$'
    ON CONFLICT (key_hash) DO NOTHING
    RETURNING id, campaign_id)
UPDATE campaigns c SET api_key_id = moved.id FROM moved WHERE c.id = moved.campaign_id;

ALTER TABLE campaigns DROP COLUMN api_key_hash;

-- DMDS filters (filtros/): a named selection of contacts, those in any of `groups`
-- (all contacts when empty) whose campos hold the values of `fields`.
CREATE TABLE filters (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name       text NOT NULL,
    groups     text[] NOT NULL DEFAULT '{}',
    fields     jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, name)
);
