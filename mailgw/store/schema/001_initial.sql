-- mailgw schema, migration 001: the whole initial data model.
--
-- Applied by the migration runner in a single transaction (the runner owns
-- schema_migrations; this file must not create it nor use BEGIN/COMMIT).
-- Released migrations are never edited (O-3): later changes go in 002_... files.
--
-- Conventions:
--   * surrogate keys are bigint identities; timestamps are timestamptz;
--   * everything owned by an account is deleted with it (ON DELETE CASCADE);
--   * enumerated text states are guarded by CHECK constraints;
--   * addresses that must match case-insensitively are stored lowercase and a
--     CHECK enforces it, so UNIQUE constraints mean what they say;
--   * updated_at columns are set by the writers (no triggers on hot tables).
-- PostgreSQL 15, no extensions (gen_random_uuid() is in core).


-- Tenants: every other row belongs to one account.
CREATE TABLE accounts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text NOT NULL UNIQUE,
    plan             text NOT NULL DEFAULT 'default',
    timezone         text NOT NULL DEFAULT 'America/Bogota',   -- W-1 webhook timestamps
    active           boolean NOT NULL DEFAULT true,            -- H-1 Current_service_is_not_active
    settings         jsonb NOT NULL DEFAULT '{}',              -- S-8 policy, S-9 social links, T-3 categories, T-5, D-7 ...
    allowed_networks cidr[],                                   -- S-4 (Devino): NULL = from anywhere
    sends_per_month  integer CHECK (sends_per_month >= 0),     -- S-15: NULL = unlimited
    max_contacts     integer CHECK (max_contacts >= 0),        -- S-15: NULL = unlimited
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Account users: SMTP/HTTP login credentials (S-3a, Teenvio "user.plan").
CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,                               -- slow salted hash (S-3, R-5)
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_account_id_idx ON users (account_id);

-- HTTP API keys; only the SHA-256 of the key is stored (R-5).
CREATE TABLE api_keys (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name       text NOT NULL DEFAULT '',
    key_hash   text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),  -- sha256 hex
    key_prefix text NOT NULL,                                  -- first characters, for display
    can_send   boolean NOT NULL DEFAULT true,                  -- H-1 API_key_not_authorized
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_account_id_idx ON api_keys (account_id);

-- Sending domains: DKIM key and Return-Path (bounce) domain per domain (D-2, O-4).
CREATE TABLE sender_domains (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id         bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    domain             text NOT NULL CHECK (domain = lower(domain)),
    dkim_selector      text NOT NULL,
    dkim_algorithm     text NOT NULL DEFAULT 'rsa' CHECK (dkim_algorithm IN ('rsa', 'ed25519')),
    dkim_private_key   text NOT NULL,                          -- PEM
    dkim_public_key    text NOT NULL,                          -- the p= value of the DNS record
    return_path_domain text NOT NULL,                          -- VERP bounce domain (D-2, D-7)
    verified_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, domain)
);

-- Individually registered sender addresses (S-6).
CREATE TABLE senders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    address     text NOT NULL CHECK (address = lower(address)),
    verified_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, address)
);

-- Contacts, one per account and address; id doubles as the DMDS contact numid.
CREATE TABLE contacts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    email        text NOT NULL CHECK (email = lower(email)),
    fields       jsonb NOT NULL DEFAULT '{}',                  -- nombre, apellido, ... and campos
    invalid      boolean NOT NULL DEFAULT false,
    whitelisted  boolean NOT NULL DEFAULT false,
    hard_bounces integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, email)
);
-- H-2 invalidos/: list an account's invalid contacts without a scan.
CREATE INDEX contacts_invalid_idx ON contacts (account_id) WHERE invalid;

-- Contact groups ("bases"): manual, or one per SMTP submission / API call (S-7).
CREATE TABLE groups (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name       text NOT NULL,
    origin     text NOT NULL DEFAULT 'manual' CHECK (origin IN ('smtp', 'api', 'dmds', 'manual')),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, name)
);

-- Group membership (many to many).
CREATE TABLE group_members (
    group_id   bigint NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    contact_id bigint NOT NULL REFERENCES contacts (id) ON DELETE CASCADE,
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, contact_id)
);
CREATE INDEX group_members_contact_id_idx ON group_members (contact_id);

-- DMDS campaigns: defaults for sends, and the SMTP credential dmdsid-<numid> (S-3b, H-2).
CREATE SEQUENCE campaigns_numid_seq AS bigint;
CREATE TABLE campaigns (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid         uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    numid        bigint NOT NULL UNIQUE DEFAULT nextval('campaigns_numid_seq'),  -- global
    account_id   bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    type         text NOT NULL CHECK (type IN ('api', 'normal', 'bulk')),
    name         text NOT NULL DEFAULT '',
    sender       text,
    sender_name  text,
    reply_to     text,
    subject      text,
    subject_uri  text,                                         -- asunto_uri for XYZTAG-CURLXYZ
    content_uri  text,
    api_key_hash text,                                         -- sha256 hex of camp_apikey (R-5)
    created_at   timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE campaigns_numid_seq OWNED BY campaigns.numid;
CREATE INDEX campaigns_account_id_idx ON campaigns (account_id, type);

-- Stored templates, addressed by the external Aldeamo template_id (S-10, H-1).
CREATE TABLE templates (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    template_id text NOT NULL,
    name        text NOT NULL DEFAULT '',
    subject     text NOT NULL DEFAULT '',
    html        text,
    text        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, template_id)
);

-- Reusable content pieces: the HTML of each submission (S-14).
CREATE TABLE contents (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name       text NOT NULL DEFAULT '',
    html       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX contents_account_id_idx ON contents (account_id);

-- Sends: the statistics unit (S-12 send id, DMDS eeid batch; H-4).
CREATE TABLE sends (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    campaign_id bigint REFERENCES campaigns (id) ON DELETE SET NULL,
    origin      text NOT NULL CHECK (origin IN ('smtp', 'api', 'dmds')),
    eeid        uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    subject     text,
    sender      text,
    group_id    bigint REFERENCES groups (id) ON DELETE SET NULL,
    content_id  bigint REFERENCES contents (id) ON DELETE SET NULL,
    archive     boolean NOT NULL DEFAULT false,                -- S-14 / DMDS archive:true
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sends_account_created_idx ON sends (account_id, created_at);
CREATE INDEX sends_campaign_id_idx ON sends (campaign_id) WHERE campaign_id IS NOT NULL;

-- Messages: one per submission (SMTP DATA or API call), content stored once (principle 4).
CREATE TABLE messages (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    send_id        bigint NOT NULL REFERENCES sends (id) ON DELETE CASCADE,
    message_uid    text NOT NULL UNIQUE CHECK (message_uid ~ '^[0-9a-f]{32}$'),  -- S-12 message_id
    sender         text,
    reply_to       text,
    subject        text,
    headers        jsonb NOT NULL DEFAULT '{}',
    custom_headers jsonb NOT NULL DEFAULT '{}',                -- S-9 other X- headers, reported in W-1
    options        jsonb NOT NULL DEFAULT '{}',                -- S-9 switches, template variables, ...
    client_ip      inet,                                       -- W-1 "ip": where the submission came from
    body           bytea,                                      -- prepared or raw content
    raw            bytea,                                      -- the raw message, when archiving (S-14)
    size           integer NOT NULL DEFAULT 0 CHECK (size >= 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_send_id_idx ON messages (send_id);

-- Delivery queue: one row per (message, recipient), claimed with
-- FOR UPDATE SKIP LOCKED and a lease (D-1, D-5).
CREATE TABLE deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    account_id       bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    contact_id       bigint REFERENCES contacts (id) ON DELETE SET NULL,
    recipient        text NOT NULL,
    kind             text NOT NULL DEFAULT 'to' CHECK (kind IN ('to', 'cc', 'bcc')),
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'sent', 'deferred', 'bounced', 'not_sent')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    lease_owner      text,
    lease_expires_at timestamptz,
    last_reply       text,
    sent_eml         bytea,                                    -- H-2 eeid_eml: the EML as sent, only for archived sends
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Claiming due rows: small, only covers rows still waiting.
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX deliveries_message_id_idx ON deliveries (message_id);
CREATE INDEX deliveries_account_contact_idx ON deliveries (account_id, contact_id);

-- The canonical event log (E-1); DMDS views and Aldeamo webhooks are projections (E-2).
-- send_id, message_id, delivery_id and contact_id deliberately carry no foreign
-- keys: the log is append-only history written on hot paths (no FK lookups per
-- insert, no SET NULL cascades into a large table), it must outlive deleted
-- contacts or sends, and identity ids are never reused, so a stale id is
-- never mistaken for another row. account_id keeps its cascading FK.
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    send_id     bigint,
    message_id  bigint,
    delivery_id bigint,
    contact_id  bigint,
    recipient   text,                                          -- E-1 "recipient", kept if the contact goes
    type        text NOT NULL CHECK (type IN (
                    'queued', 'sent', 'deferred', 'bounced', 'not_sent',
                    'open', 'click', 'unsubscribed', 'resubscribed',
                    'complaint', 'invalidated', 'revalidated')),
    occurred_at timestamptz NOT NULL DEFAULT now(),
    details     jsonb NOT NULL DEFAULT '{}'                    -- soft/hard, reply, ip, geo, device, url, ...
);
CREATE INDEX events_account_occurred_idx ON events (account_id, occurred_at);
CREATE INDEX events_send_id_idx ON events (send_id) WHERE send_id IS NOT NULL;
CREATE INDEX events_delivery_id_idx ON events (delivery_id) WHERE delivery_id IS NOT NULL;
CREATE INDEX events_contact_id_idx ON events (contact_id) WHERE contact_id IS NOT NULL;

-- Suppression list: unsubscribes (per sender domain and category), complaints,
-- hard bounces and manual entries, honoured by every later send (T-3, D-6).
CREATE TABLE suppressions (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    address      text NOT NULL,
    scope_domain text,                                         -- NULL = every sender domain
    category     text,                                         -- NULL = every category
    reason       text NOT NULL CHECK (reason IN ('unsubscribed', 'complaint', 'hard_bounce', 'manual')),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX suppressions_scope_uidx
    ON suppressions (account_id, address, coalesce(scope_domain, ''), coalesce(category, ''));

-- Webhook endpoints per account with the event types each wants (W-1).
CREATE TABLE webhook_endpoints (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    url           text NOT NULL,
    secret        text NOT NULL,                               -- HMAC-SHA256 signing key (W-2)
    event_types   text[] NOT NULL CHECK (event_types <@ ARRAY[
                      -- W-1 names, plus the E-1 names for mailgw's own use
                      'sent', 'click', 'complaint', 'open', 'unsubscribed', 'bounce',
                      'queued', 'deferred', 'bounced', 'not_sent', 'resubscribed',
                      'invalidated', 'revalidated']::text[]),
    active        boolean NOT NULL DEFAULT true,
    dropped_count bigint NOT NULL DEFAULT 0,                   -- W-2: dropped past the queue cap
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_account_id_idx ON webhook_endpoints (account_id);

-- Webhook delivery queue: one row per (endpoint, event) with retries (W-2).
CREATE TABLE webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        bigint,                                    -- no FK, as for events' hot columns
    payload         jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed', 'dropped')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_pending_idx ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE state = 'pending';

-- DMDS global variables (variables/: list with values, create, delete).
CREATE TABLE global_variables (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name       text NOT NULL,
    value      text NOT NULL DEFAULT '',                       -- H-2: the list shows names and values
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, name)
);
