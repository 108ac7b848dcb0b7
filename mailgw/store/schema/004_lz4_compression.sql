-- Large values (message bodies, content pieces, attachments, archived raw and sent
-- messages) are compressed with LZ4 rather than pglz when they are TOASTed: several times
-- faster for the database on the submission path, at a similar ratio for mail text.
-- A PostgreSQL built without LZ4 keeps pglz (the DO block swallows only that error).
DO $$
BEGIN
    ALTER TABLE messages ALTER COLUMN body SET COMPRESSION lz4,
                         ALTER COLUMN raw SET COMPRESSION lz4;
    ALTER TABLE contents ALTER COLUMN html SET COMPRESSION lz4;
    ALTER TABLE attachments ALTER COLUMN data SET COMPRESSION lz4;
    ALTER TABLE deliveries ALTER COLUMN sent_eml SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'PostgreSQL without LZ4: large values stay pglz-compressed';
END
$$;
