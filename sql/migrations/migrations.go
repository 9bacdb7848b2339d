// Package migrations holds the database schema as ordered SQL files, embedded
// so that every binary carries the schema it was built against.
//
// Files are applied by goose (see shared/pg.Migrate); each has an Up and a Down
// section. Never edit a file that has been released: add a new one.
package migrations

import "embed"

// FS holds the migration files, named NNNNN_description.sql.
//
//go:embed *.sql
var FS embed.FS
