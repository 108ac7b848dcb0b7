-- Failed SMTP AUTH attempts counted by every node together (S-3, R-6): one row per
-- counted key (a client address, a username, a username at an address).  The key is
-- a 16-byte digest: any username fits, and failed usernames (often a password typed
-- in the wrong box) are not stored.  The times come from the nodes' clocks.
-- UNLOGGED: the counts are worth no WAL flush per failure; a crash of PostgreSQL
-- (or a failover) empties the table, which only forgets recent failures.
CREATE UNLOGGED TABLE auth_failures (
    key          bytea PRIMARY KEY CHECK (length(key) = 16),
    failures     integer NOT NULL CHECK (failures >= 0),
    last_failure timestamptz NOT NULL
);

-- Each node reads the rows changed since its last read; failures delete expired rows.
CREATE INDEX auth_failures_last_failure ON auth_failures (last_failure);
