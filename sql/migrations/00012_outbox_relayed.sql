-- Relayed events stay in PostgreSQL for a while (RELAY_RETENTION), so that
-- the relay can publish them again when Redis forgets them: a Memorystore
-- Basic Tier maintenance flush, a failover that dropped the last writes, a
-- Redis without persistence restarting, a stream deleted by hand.
--
-- The relay still deletes every row it claims from outbox, so that table and
-- its index stay as small as the backlog; the same statement copies the row
-- here, with the number of the batch that claimed it (from the sequence
-- outbox_relay_batch; one number per claiming transaction). Batches are
-- numbered in the order they were published, and within a batch the stream
-- order is id order: (batch, id) is the order to publish them again in.
--
-- outbox_relay_batches records, for each batch and each stream it wrote to,
-- the id of the last entry the batch has in that stream (a Redis stream id
-- <ms>-<seq>, kept as two numbers so that they compare as Redis compares
-- them). outbox_streams holds the same for the newest batch of each stream,
-- with the stream's entries-added counter (XINFO STREAM) after it, and
-- whether a re-publication of the stream is under way (replay_from: the first
-- batch still to publish again). When a stream in Redis is gone, its
-- last-generated-id is behind the newest record (a failover dropped the last
-- writes), or its entries-added counter is (it was deleted and created
-- again), the batches Redis no longer has are published again.
--
-- The three tables are written in the transaction that deletes the batch's
-- rows from outbox, so a batch is retained exactly when it is relayed. The
-- relay purges outbox_relayed and outbox_relay_batches after the retention
-- window, oldest batches first, a few thousand rows per statement.
--
-- Why a second table rather than marking rows in outbox: marked rows would
-- make the claim query walk past a day of relayed rows (or need a partial
-- index that bloats at the rate of the traffic); an insert-only table purged
-- from its head keeps the outbox exactly as it was.

-- +goose Up
CREATE SEQUENCE outbox_relay_batch AS bigint;

CREATE TABLE outbox_relayed (
    batch          bigint      NOT NULL,
    id             bigint      NOT NULL,
    event_id       uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        json        NOT NULL,
    traceparent    text,
    created_at     timestamptz NOT NULL
);

-- Rows arrive in batch order, so a BRIN index finds a range of batches for
-- next to nothing per row: a b-tree on (batch, id) measured 1.2 µs more per
-- relayed row, an eighth of the relay's whole cost per event. Readers take a
-- range of batches (outbox_relay_batches says how many events each holds)
-- and sort it. outboxctl replay by event id scans the table, which an
-- operator can afford.
CREATE INDEX outbox_relayed_batch_idx ON outbox_relayed USING brin (batch);

CREATE TABLE outbox_relay_batches (
    batch          bigint      NOT NULL,
    aggregate_type text        NOT NULL,
    -- The batch's events of that type retained in outbox_relayed.
    events         integer     NOT NULL,
    last_ms        bigint      NOT NULL,
    last_seq       bigint      NOT NULL,
    relayed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch, aggregate_type)
);

-- A stream's batches, for finding what it lost and publishing it again.
CREATE INDEX outbox_relay_batches_stream_idx ON outbox_relay_batches (aggregate_type, batch);

-- The purge finds the newest batch past the retention window; rows arrive in
-- time order, so a BRIN index costs next to nothing to keep.
CREATE INDEX outbox_relay_batches_relayed_at_idx ON outbox_relay_batches USING brin (relayed_at);

CREATE TABLE outbox_streams (
    aggregate_type text        PRIMARY KEY,
    batch          bigint      NOT NULL,
    last_ms        bigint      NOT NULL,
    last_seq       bigint      NOT NULL,
    entries_added  bigint      NOT NULL,
    replay_from    bigint,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE outbox_streams;
DROP TABLE outbox_relay_batches;
DROP TABLE outbox_relayed;
DROP SEQUENCE outbox_relay_batch;
