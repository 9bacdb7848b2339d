-- Partitioned streams (STREAM_PARTITIONS, issue 18): the relay may spread
-- an aggregate type over N streams, <prefix><type>:<p>, by a hash of
-- aggregate_id. Its records are then per partition: outbox_streams holds
-- one row per stream, and outbox_relay_batches one row per batch and
-- stream. partitions says how many partitions the type had when the row was
-- written: a relay refuses to start when outbox_streams shows another
-- number than its own (see README, "Changing STREAM_PARTITIONS"), and a
-- re-publication reads only the batches written with its own.
--
-- Columns with a constant default change only the catalog (PostgreSQL 11
-- and later). The primary keys are rebuilt: outbox_streams has a row per
-- stream; outbox_relay_batches a row per retained batch and stream (a day
-- at most), which this migration holds locked while it indexes them again.

-- +goose Up
ALTER TABLE outbox_streams
    ADD COLUMN partition  integer NOT NULL DEFAULT 0,
    ADD COLUMN partitions integer NOT NULL DEFAULT 1;
ALTER TABLE outbox_streams DROP CONSTRAINT outbox_streams_pkey;
ALTER TABLE outbox_streams ADD PRIMARY KEY (aggregate_type, partition);

ALTER TABLE outbox_relay_batches
    ADD COLUMN partition  integer NOT NULL DEFAULT 0,
    ADD COLUMN partitions integer NOT NULL DEFAULT 1;
ALTER TABLE outbox_relay_batches DROP CONSTRAINT outbox_relay_batches_pkey;
ALTER TABLE outbox_relay_batches ADD PRIMARY KEY (batch, aggregate_type, partition);
DROP INDEX outbox_relay_batches_stream_idx;
CREATE INDEX outbox_relay_batches_stream_idx ON outbox_relay_batches (aggregate_type, partition, batch);

-- +goose Down
DROP INDEX outbox_relay_batches_stream_idx;
CREATE INDEX outbox_relay_batches_stream_idx ON outbox_relay_batches (aggregate_type, batch);
DELETE FROM outbox_relay_batches WHERE partitions <> 1;
ALTER TABLE outbox_relay_batches DROP CONSTRAINT outbox_relay_batches_pkey;
ALTER TABLE outbox_relay_batches ADD PRIMARY KEY (batch, aggregate_type);
ALTER TABLE outbox_relay_batches DROP COLUMN partitions, DROP COLUMN partition;
DELETE FROM outbox_streams WHERE partitions <> 1;
ALTER TABLE outbox_streams DROP CONSTRAINT outbox_streams_pkey;
ALTER TABLE outbox_streams ADD PRIMARY KEY (aggregate_type);
ALTER TABLE outbox_streams DROP COLUMN partitions, DROP COLUMN partition;
