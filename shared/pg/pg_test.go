package pg

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

func TestIsUnavailable(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"a deadline", fmt.Errorf("insert: %w", context.DeadlineExceeded), true},
		{"an admin shutdown", &pgconn.PgError{Code: "57P01"}, true},
		{"too many connections", &pgconn.PgError{Code: "53300"}, true},
		{"a serialization failure", &pgconn.PgError{Code: "40001"}, true},
		{"a unique violation", &pgconn.PgError{Code: "23505"}, false},
		{"a syntax error", &pgconn.PgError{Code: "42601"}, false},
		{"an unrelated error", errors.New("boom"), false},
		{"no error", nil, false},
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, IsUnavailable(tt.err), tt.name)
	}
}

func TestIsUniqueViolationChecksTheConstraint(t *testing.T) {
	err := fmt.Errorf("insert: %w", &pgconn.PgError{Code: "23505", ConstraintName: "users_email_lower_key"})
	require.True(t, IsUniqueViolation(err, "users_email_lower_key"))
	require.True(t, IsUniqueViolation(err, ""))
	require.False(t, IsUniqueViolation(err, "other_key"))
	require.False(t, IsUniqueViolation(errors.New("x"), ""))
}
