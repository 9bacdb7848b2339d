-- createuser's abuse limits: one row per key ("addr:198.51.100.7",
-- "domain:example.com"), shared by every instance.
--
-- Each row is a GCRA bucket: tat ("theoretical arrival time") is when the
-- key's bucket will be empty again. A request is allowed when
-- greatest(tat, now()) + window/limit <= now() + window, and then moves tat on
-- by window/limit; a refused request changes nothing. One UPSERT per key and
-- request, no read-then-write race, and a row whose tat has passed means the
-- same as no row, so any such row may be deleted at any time.
--
-- UNLOGGED: a limiter's counts are not worth a WAL flush per request. The
-- table is emptied by a crash and is not on replicas; after either the limits
-- start afresh, which costs nothing but a short window of leniency.
-- fillfactor leaves room on each page so that updates stay HOT.

-- +goose Up
CREATE UNLOGGED TABLE rate_limits (
    key text        PRIMARY KEY,
    tat timestamptz NOT NULL
) WITH (fillfactor = 70);

-- +goose Down
DROP TABLE rate_limits;
