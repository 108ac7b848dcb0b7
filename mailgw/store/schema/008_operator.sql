-- The header From the client wrote (display name aside, which is in the body), kept
-- when it is a verified sender of the account; NULL: the From is the envelope sender.
-- The DKIM key and the return-path domain are those of its domain (DMARC alignment).
ALTER TABLE messages ADD COLUMN from_address text;
