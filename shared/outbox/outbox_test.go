package outbox_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/outbox"
	"github.com/outboxfn/outbox/shared/pgtest"
)

// aggregateTypes are the cases both the Go rule and the CHECK constraint
// must agree on.
var aggregateTypes = []struct {
	name  string
	typ   string
	valid bool
}{
	{"a plain word is valid", "user", true},
	{"a dotted version is valid", "order.v2", true},
	{"mixed case, digits, '-' and '_' are valid", "A-1_b", true},
	{"one character is valid", "x", true},
	{"100 characters are valid", strings.Repeat("a", 100), true},
	{"the relay's own key is invalid", "_relay:epoch", false},
	{"a dead-letter stream is invalid", "user:dead", false},
	{"any ':' is invalid", "a:b", false},
	{"a leading '_' is invalid", "_user", false},
	{"a leading '.' is invalid", ".user", false},
	{"the empty string is invalid", "", false},
	{"101 characters are invalid", strings.Repeat("a", 101), false},
	{"a space is invalid", "user created", false},
	{"a trailing newline is invalid", "user\n", false},
	{"a non-ASCII letter is invalid", "usér", false},
	{"a glob character is invalid", "user*", false},
}

func TestValidAggregateTypeAgreesWithTheCheckConstraint(t *testing.T) {
	t.Parallel()
	_, pool := pgtest.NewPool(t)
	ctx := context.Background()
	for _, tt := range aggregateTypes {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.valid, outbox.ValidAggregateType(tt.typ), "ValidAggregateType(%q)", tt.typ)

			_, err := pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
				VALUES ($1, '1', 'x.happened', '{}')`, tt.typ)
			if tt.valid {
				require.NoError(t, err)
				return
			}
			var pgErr *pgconn.PgError
			require.ErrorAs(t, err, &pgErr)
			require.Equal(t, "23514", pgErr.Code, "check_violation")
			require.Equal(t, "outbox_aggregate_type_check", pgErr.ConstraintName)
		})
	}
}

func TestInsert(t *testing.T) {
	t.Parallel()

	t.Run("refuses an invalid aggregate type before it touches the transaction", func(t *testing.T) {
		t.Parallel()
		_, pool := pgtest.NewPool(t)
		ctx := context.Background()
		for _, tt := range aggregateTypes {
			if tt.valid {
				continue
			}
			err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				err := outbox.Insert(ctx, tx, outbox.Event{AggregateType: tt.typ, AggregateID: "1",
					EventType: "x.happened", Payload: []byte(`{}`)})
				require.ErrorIs(t, err, outbox.ErrInvalidAggregateType, "%q", tt.typ)
				var pgErr *pgconn.PgError
				require.False(t, errors.As(err, &pgErr), "the database was asked: %v", err)
				// A refused INSERT would have aborted the transaction;
				// this statement shows it is still usable.
				_, err = tx.Exec(ctx, `SELECT 1`)
				return err
			})
			require.NoError(t, err, "%q", tt.typ)
		}
		require.Zero(t, count(t, pool, "outbox"))
	})

	t.Run("writes a valid event with a database-assigned event id", func(t *testing.T) {
		t.Parallel()
		_, pool := pgtest.NewPool(t)
		ctx := context.Background()
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			return outbox.Insert(ctx, tx, outbox.Event{AggregateType: "order.v2", AggregateID: "7",
				EventType: "order.placed", Payload: []byte(`{"b":1, "a":2}`)})
		})
		require.NoError(t, err)
		var typ, payload, eventID string
		require.NoError(t, pool.QueryRow(ctx, `SELECT aggregate_type, payload::text, event_id::text FROM outbox`).
			Scan(&typ, &payload, &eventID))
		require.Equal(t, "order.v2", typ)
		require.Equal(t, `{"b":1, "a":2}`, payload, "byte for byte")
		require.Len(t, eventID, 36)
	})
}

func TestTheCheckLeavesRowsWrittenBeforeItAlone(t *testing.T) {
	t.Parallel()
	_, pool := pgtest.NewPool(t)
	ctx := context.Background()
	// Replay the migration's ALTER on a table that already holds a row the
	// rule refuses: NOT VALID must neither fail nor touch it.
	_, err := pool.Exec(ctx, `ALTER TABLE outbox DROP CONSTRAINT outbox_aggregate_type_check`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		VALUES ('_relay:epoch', '1', 'x.happened', '{}')`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `ALTER TABLE outbox ADD CONSTRAINT outbox_aggregate_type_check
		CHECK (aggregate_type ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$') NOT VALID`)
	require.NoError(t, err)

	var typ string
	require.NoError(t, pool.QueryRow(ctx, `SELECT aggregate_type FROM outbox`).Scan(&typ))
	require.Equal(t, "_relay:epoch", typ)
	// The old row can still be moved out (the relay deletes what it
	// dead-letters), while a new bad row is refused.
	_, err = pool.Exec(ctx, `INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
		VALUES ('_relay:epoch', '2', 'x.happened', '{}')`)
	require.Error(t, err)
	_, err = pool.Exec(ctx, `DELETE FROM outbox`)
	require.NoError(t, err)
}

func TestTheMigrationsCheckIsTheGoRule(t *testing.T) {
	t.Parallel()
	_, pool := pgtest.NewPool(t)
	var def string
	require.NoError(t, pool.QueryRow(context.Background(),
		`SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'outbox_aggregate_type_check'`).Scan(&def))
	require.Contains(t, def, `'^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$'`, "keep the test's copy, the migration and ValidAggregateType in step")
	require.Contains(t, def, "NOT VALID")
}

func TestMeasureDead(t *testing.T) {
	t.Parallel()
	_, pool := pgtest.NewPool(t)
	ctx := context.Background()

	d, err := outbox.MeasureDead(ctx, pool)
	require.NoError(t, err)
	require.Equal(t, outbox.Dead{}, d, "none dead, no age")

	_, err = pool.Exec(ctx, `
		INSERT INTO outbox_dead (id, event_id, aggregate_type, aggregate_id, event_type, payload, created_at, error, dead_at)
		VALUES (1, gen_random_uuid(), '_relay:epoch', '1', 'x', '{}', now() - interval '1 day', 'WRONGTYPE', now() - interval '90 seconds'),
		       (2, gen_random_uuid(), 'user', '2', 'x', '{}', now(), 'WRONGTYPE', now())`)
	require.NoError(t, err)
	d, err = outbox.MeasureDead(ctx, pool)
	require.NoError(t, err)
	require.EqualValues(t, 2, d.Count)
	require.InDelta(t, 90, d.OldestAgeSeconds, 5, "measured from dead_at, not created_at")

	// It works inside a transaction too, as the relay may call it.
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		d, err := outbox.MeasureDead(ctx, tx)
		require.EqualValues(t, 2, d.Count)
		return err
	})
	require.NoError(t, err)
}

func count(t *testing.T, pool *pgxpool.Pool, table string) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM `+table).Scan(&n))
	return n
}
