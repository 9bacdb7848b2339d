-- Each send record counts the deliveries of its email that failed, so that
-- sendemail dead-letters an entry on its own failures, not on Redis's
-- delivery count (which also rises while PostgreSQL is down, or when a
-- consumer merely finds the email claimed by another).
--
-- claimed_by now holds a token drawn for each claim (the consumer's name
-- and a random suffix), so that only the holder of a claim can mark it sent,
-- release it or count a failure.

-- +goose Up
ALTER TABLE email_sends ADD COLUMN failures integer NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE email_sends DROP COLUMN failures;
