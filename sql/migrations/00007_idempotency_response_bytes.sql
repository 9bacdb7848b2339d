-- createuser promises that a retry with the same Idempotency-Key gets the
-- original answer byte for byte. jsonb re-encodes what it stores (its keys
-- come back sorted by length, its spacing is its own), so keep the bytes.
-- Rows written before this migration keep jsonb's rendering of their answer.

-- +goose Up
ALTER TABLE idempotency_keys
    ALTER COLUMN response TYPE bytea USING convert_to(response::text, 'UTF8');

-- +goose Down
ALTER TABLE idempotency_keys
    ALTER COLUMN response TYPE jsonb USING convert_from(response, 'UTF8')::jsonb;
