-- Aggregate types the relay can always publish, and a place for the rows it
-- could not.
--
-- The relay publishes each row to the stream STREAM_PREFIX || aggregate_type
-- and keeps its own keys beside the streams: STREAM_PREFIX || '_relay:…' and
-- each stream's dead-letter stream, stream || ':dead'. An aggregate type is
-- part of a Redis key name, so it must never be able to name one of those
-- (Redis would answer WRONGTYPE, or worse, accept an event into a dead-letter
-- stream). The pattern below rules that out: no ':' at all, so no type can
-- reach into the relay's '_relay:' namespace or end in ':dead'; no leading '_'
-- either, which keeps '_'-names free for the relay; only printable ASCII, so
-- key names read the same in redis-cli, logs and metrics; and at most 100
-- characters. shared/outbox.ValidAggregateType is the same rule in Go, so
-- that a writer gets a clear error before the database's.
--
-- NOT VALID: the constraint binds every row written from now on but neither
-- scans the table nor fails on a row already there (taking only a brief
-- SHARE ROW EXCLUSIVE lock). A row written before it with a bad type is the
-- relay's to move to outbox_dead.
--
-- outbox_dead holds rows the relay could not publish, with the error Redis
-- gave, until an operator requeues them (outboxctl outbox-dead requeue) or
-- deletes them. id is the row's id in outbox, kept for tracing; a requeued
-- row gets a new one there. No check on aggregate_type: a row is often dead
-- because its type is bad.

-- +goose Up
ALTER TABLE outbox ADD CONSTRAINT outbox_aggregate_type_check
    CHECK (aggregate_type ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$') NOT VALID;

CREATE TABLE outbox_dead (
    id             bigint      PRIMARY KEY,
    event_id       uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        json        NOT NULL,
    traceparent    text,
    created_at     timestamptz NOT NULL,
    error          text        NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE outbox_dead;
ALTER TABLE outbox DROP CONSTRAINT outbox_aggregate_type_check;
