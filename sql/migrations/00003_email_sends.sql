-- Send records: one row per business fact ("the welcome email of user 42"),
-- so that however often an event is delivered, the email goes out once.
--
-- A consumer claims the row (claimed_by, lease_until) before it talks to the
-- mail server and sets sent_at once the server accepted the message. A claim
-- whose lease ran out (its consumer crashed) can be taken over; a row with
-- sent_at set is never sent again.

-- +goose Up
CREATE TABLE email_sends (
    key         text        PRIMARY KEY,
    event_id    uuid        NOT NULL,
    claimed_by  text,
    lease_until timestamptz,
    attempts    integer     NOT NULL DEFAULT 1,
    message_id  text,
    sent_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- outboxctl purge removes old records by age.
CREATE INDEX email_sends_created_at_idx ON email_sends (created_at);

-- +goose Down
DROP TABLE email_sends;
