-- mailgw schema, migration 011: feedback notices (D-7, Aldeamo's feedback forwarding).
--
-- A notice tells the envelope sender of a message that a copy bounced or drew a
-- complaint; it is queued as a delivery of its own, of kind 'notice', which the delivery
-- engine sends like any other but for which no events are written
-- (mailgw/store/notices.py).
ALTER TABLE deliveries DROP CONSTRAINT deliveries_kind_check,
    ADD CONSTRAINT deliveries_kind_check CHECK (kind IN ('to', 'cc', 'bcc', 'notice'));
