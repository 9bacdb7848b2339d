-- The write path: users, the transactional outbox, and the idempotency keys that
-- let createuser answer a retried request with its original response.

-- +goose Up
CREATE TABLE users (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email      text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Unique regardless of letter case; createuser relies on this index (not on a
-- read-then-write check) so that concurrent requests cannot both succeed.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- One row per event not yet relayed. The relay deletes rows in the transaction
-- that publishes them, so the table stays small and its id index stays hot.
CREATE TABLE outbox (
    -- Orders rows for the relay; a gap or out-of-order commit is harmless
    -- because the relay claims rows, it does not follow a cursor.
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Idempotency key carried to every consumer.
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    -- json, not jsonb: stored and relayed byte for byte, and cheaper to read.
    payload        json        NOT NULL,
    -- W3C trace context of the request that wrote the event, if any.
    traceparent    text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The doorbell: a notification without payload on channel "outbox" when rows
-- are inserted. One per statement, never one per row, and never the event
-- itself (payloads are limited to 8000 bytes and would leak data to any
-- listener). Later migrations may change when it rings, not what it says.
-- +goose StatementBegin
CREATE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox_notify();

-- A createuser response remembered under the client's Idempotency-Key, written
-- in the same transaction as the user so that both or neither exist.
CREATE TABLE idempotency_keys (
    key          text        PRIMARY KEY,
    request_hash bytea       NOT NULL,
    status       integer     NOT NULL,
    response     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE idempotency_keys;
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
DROP TABLE outbox;
DROP TABLE users;
