-- outboxctl purge deletes idempotency keys by age, in small batches; without
-- this index each batch would scan the table.

-- +goose Up
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

-- +goose Down
DROP INDEX idempotency_keys_created_at_idx;
