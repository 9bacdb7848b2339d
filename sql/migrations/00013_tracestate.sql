-- The W3C tracestate that came with an event's traceparent (vendor-specific
-- trace data such as a sampling decision), carried with the event from the
-- request to the stream entry, so that a consumer continues the trace exactly
-- as the caller began it. NULL when the request had none. Adding a nullable
-- column without a default changes only the catalog: no table is rewritten.

-- +goose Up
ALTER TABLE outbox ADD COLUMN tracestate text;
ALTER TABLE outbox_relayed ADD COLUMN tracestate text;
ALTER TABLE outbox_dead ADD COLUMN tracestate text;

-- +goose Down
ALTER TABLE outbox_dead DROP COLUMN tracestate;
ALTER TABLE outbox_relayed DROP COLUMN tracestate;
ALTER TABLE outbox DROP COLUMN tracestate;
