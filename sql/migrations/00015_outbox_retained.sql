-- Retained events are kept one row per batch (issue 12): a batch's events,
-- encoded one after the other in a bytea, in outbox_retained. A row per
-- event (outbox_relayed until now) cost the relay's drain more PostgreSQL
-- time than the claim itself: a heap tuple, its WAL record, an index entry
-- and a json check per event. One row per batch costs one of each per
-- thousand events; measured by make bench, the drain went from 0.42 to
-- about 0.5 of the raw SQL drain.
--
-- data holds each event as PostgreSQL's binary COPY writes a row of
-- (id, event_id, aggregate_type, aggregate_id, event_type, payload,
-- traceparent, created_at, tracestate): a 16-bit field count (9), then per
-- field a 32-bit length (-1 for NULL) and the value in its binary send
-- form (payload as its json text), in id order, the order the batch was
-- published in. The relay and outboxctl decode it (shared/outbox); so does
-- outbox_retained_events below, for SQL.
--
-- outbox_relayed becomes a view of every retained event, so that queries
-- written for the table keep working: the rows retained before this
-- migration (kept in outbox_relayed_rows until the relay purges them, as
-- before) and the events of outbox_retained. A relay of an earlier release
-- still running during a rolling deploy copies its batches into the view;
-- a trigger keeps them, as rows, in outbox_relayed_rows.

-- +goose Up
CREATE TABLE outbox_retained (
    batch       bigint      PRIMARY KEY,
    -- How many events data holds, and the oldest created_at among them: the
    -- purge horizon of outboxctl purge, without decoding anything.
    events      integer     NOT NULL,
    oldest      timestamptz NOT NULL,
    data        bytea       NOT NULL
);

-- A batch's data is tens to hundreds of kilobytes, stored out of line.
-- lz4 compresses it for about what pglz's checks alone cost (pglz itself
-- measured three times the cost of a row per event); a server built without
-- lz4 stores it uncompressed.
-- +goose StatementBegin
DO $$
BEGIN
    EXECUTE 'ALTER TABLE outbox_retained ALTER COLUMN data SET COMPRESSION lz4';
EXCEPTION WHEN OTHERS THEN
    ALTER TABLE outbox_retained ALTER COLUMN data SET STORAGE EXTERNAL;
END
$$;
-- +goose StatementEnd

ALTER TABLE outbox_relayed RENAME TO outbox_relayed_rows;
ALTER INDEX outbox_relayed_batch_idx RENAME TO outbox_relayed_rows_batch_idx;

-- outbox_retained_events decodes data (see above) for SQL; the relay and
-- outboxctl decode it in Go. It works on a copy of its argument: data is
-- stored compressed, and each substring() of the stored value would
-- decompress it again up to that point (a batch would cost time quadratic
-- in its size: 4000 events, 4 s instead of 23 ms).
-- +goose StatementBegin
CREATE FUNCTION outbox_retained_events(data bytea)
RETURNS TABLE (id bigint, event_id uuid, aggregate_type text, aggregate_id text, event_type text,
               payload json, traceparent text, created_at timestamptz, tracestate text)
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    buf bytea := data || ''::bytea;
    pos int := 1;
    len int;
    field int;
    v bytea[];
    micros bigint;
    days bigint;
    rest bigint;
BEGIN
    WHILE pos <= length(buf) LOOP
        IF ('x' || encode(substring(buf FROM pos FOR 2), 'hex'))::bit(16)::int <> 9 THEN
            RAISE EXCEPTION 'outbox_retained_events: bad field count at byte %', pos;
        END IF;
        pos := pos + 2;
        v := ARRAY[]::bytea[];
        FOR field IN 1..9 LOOP
            len := ('x' || encode(substring(buf FROM pos FOR 4), 'hex'))::bit(32)::int;
            pos := pos + 4;
            IF len < 0 THEN
                v := v || NULL::bytea;
            ELSE
                v := v || substring(buf FROM pos FOR len);
                pos := pos + len;
            END IF;
        END LOOP;
        id := ('x' || encode(v[1], 'hex'))::bit(64)::bigint;
        event_id := encode(v[2], 'hex')::uuid;
        aggregate_type := convert_from(v[3], 'UTF8');
        aggregate_id := convert_from(v[4], 'UTF8');
        event_type := convert_from(v[5], 'UTF8');
        payload := convert_from(v[6], 'UTF8')::json;
        traceparent := convert_from(v[7], 'UTF8');
        -- Microseconds since 2000-01-01 UTC, added as whole days and the
        -- seconds left, each exact (an interval times a big number is not).
        micros := ('x' || encode(v[8], 'hex'))::bit(64)::bigint;
        IF micros = 9223372036854775807 THEN
            created_at := 'infinity';
        ELSIF micros = -9223372036854775808 THEN
            created_at := '-infinity';
        ELSE
            days := micros / 86400000000;
            rest := micros % 86400000000;
            IF rest < 0 THEN
                days := days - 1;
                rest := rest + 86400000000;
            END IF;
            created_at := (timestamp '2000-01-01' + days * interval '1 day' + make_interval(secs => rest / 1000000)
                           + (rest % 1000000) * interval '1 microsecond') AT TIME ZONE 'UTC';
        END IF;
        tracestate := convert_from(v[9], 'UTF8');
        RETURN NEXT;
    END LOOP;
END
$$;
-- +goose StatementEnd

CREATE VIEW outbox_relayed AS
SELECT batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate
FROM outbox_relayed_rows
UNION ALL
SELECT r.batch, e.id, e.event_id, e.aggregate_type, e.aggregate_id, e.event_type, e.payload, e.traceparent, e.created_at, e.tracestate
FROM outbox_retained r CROSS JOIN LATERAL outbox_retained_events(r.data) e;

-- +goose StatementBegin
CREATE FUNCTION outbox_relayed_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_relayed_rows (batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate)
    VALUES (NEW.batch, NEW.id, NEW.event_id, NEW.aggregate_type, NEW.aggregate_id, NEW.event_type, NEW.payload, NEW.traceparent, NEW.created_at, NEW.tracestate);
    RETURN NEW;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER outbox_relayed_insert INSTEAD OF INSERT ON outbox_relayed
    FOR EACH ROW EXECUTE FUNCTION outbox_relayed_insert();

-- A relay of an earlier release deletes through the view: from its own
-- batch (rows), the events Redis refused, and when it purges, every event
-- of a range of batches. The events of outbox_retained go by whole
-- batches: deleting one of a batch's events deletes the batch (rewriting
-- it without the event, once per event, would cost a purge time quadratic
-- in a batch's size).
-- +goose StatementBegin
CREATE FUNCTION outbox_relayed_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM outbox_relayed_rows WHERE batch = OLD.batch AND id = OLD.id;
    IF NOT FOUND THEN
        DELETE FROM outbox_retained WHERE batch = OLD.batch;
    END IF;
    RETURN OLD;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER outbox_relayed_delete INSTEAD OF DELETE ON outbox_relayed
    FOR EACH ROW EXECUTE FUNCTION outbox_relayed_delete();

-- +goose Down
DROP VIEW outbox_relayed;
DROP FUNCTION outbox_relayed_insert();
DROP FUNCTION outbox_relayed_delete();
ALTER TABLE outbox_relayed_rows RENAME TO outbox_relayed;
ALTER INDEX outbox_relayed_rows_batch_idx RENAME TO outbox_relayed_batch_idx;
INSERT INTO outbox_relayed (batch, id, event_id, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, tracestate)
SELECT r.batch, e.id, e.event_id, e.aggregate_type, e.aggregate_id, e.event_type, e.payload, e.traceparent, e.created_at, e.tracestate
FROM outbox_retained r CROSS JOIN LATERAL outbox_retained_events(r.data) e;
DROP FUNCTION outbox_retained_events(bytea);
DROP TABLE outbox_retained;
