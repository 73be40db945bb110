package state

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// migrations are the schema changes, in order; migrations[i] takes the
// database from version i to i+1. Never edit one that has shipped: a
// database that already ran it would not run it again. Append instead.
//
// Tables are STRICT so a value of the wrong type is an error at write
// time, not a surprise at the next Load.
var migrations = []string{
	// 1: the three override kinds.
	`
CREATE TABLE route_override (
	listener   TEXT NOT NULL,
	sni        TEXT NOT NULL,
	deleted    INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
	route      TEXT,              -- config.Route as JSON; NULL for a tombstone
	updated_at TEXT NOT NULL,     -- RFC 3339, UTC
	PRIMARY KEY (listener, sni),
	CHECK ((deleted = 1) = (route IS NULL))
) STRICT;

CREATE TABLE firewall_override (
	value      TEXT PRIMARY KEY,  -- normalised prefix, e.g. 192.0.2.1/32
	action     TEXT NOT NULL CHECK (action IN ('add', 'remove')),
	updated_at TEXT NOT NULL
) STRICT;

CREATE TABLE listener_override (
	listener   TEXT NOT NULL,
	setting    TEXT NOT NULL CHECK (setting IN ('max_connections')),
	value      INTEGER NOT NULL CHECK (value >= 0),
	updated_at TEXT NOT NULL,
	PRIMARY KEY (listener, setting)
) STRICT;
`,
	// 2: who made each change, and a key/value table for facts about the
	// store itself (the config file hash recorded at first start). Rows
	// from version 1 get an empty actor: nobody recorded who wrote them.
	`
ALTER TABLE route_override    ADD COLUMN actor TEXT NOT NULL DEFAULT '';
ALTER TABLE firewall_override ADD COLUMN actor TEXT NOT NULL DEFAULT '';
ALTER TABLE listener_override ADD COLUMN actor TEXT NOT NULL DEFAULT '';

CREATE TABLE meta (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
) STRICT;
`,
}

// migrate applies migrations[v:upTo] where v is the database's version,
// each in its own transaction together with its schema_version row, so a
// crash leaves the database at some whole version. The version is read
// inside the transaction, under the write lock: two processes opening the
// same new file cannot both apply a migration.
func migrate(ctx context.Context, db *sql.DB, path string, upTo int) error {
	for {
		done, err := migrateStep(ctx, db, path, upTo)
		if err != nil {
			return err
		}
		if done {
			return nil
		}
	}
}

func migrateStep(ctx context.Context, db *sql.DB, path string, upTo int) (done bool, err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("state: migrate %s: %w", path, err)
	}
	defer func() {
		if err != nil || done {
			tx.Rollback()
		}
	}()
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
	version    INTEGER PRIMARY KEY,
	applied_at TEXT NOT NULL
) STRICT`); err != nil {
		return false, fmt.Errorf("state: migrate %s: %w", path, err)
	}
	v, err := schemaVersion(ctx, tx)
	if err != nil {
		return false, fmt.Errorf("state: migrate %s: %w", path, err)
	}
	if v > len(migrations) {
		// A newer binary wrote this file; running on it could misread or
		// clobber what that binary stores.
		return false, fmt.Errorf("state: database %s has schema version %d, this binary knows up to %d", path, v, len(migrations))
	}
	if v >= upTo {
		return true, nil
	}
	if _, err := tx.ExecContext(ctx, migrations[v]); err != nil {
		return false, fmt.Errorf("state: migrate %s to version %d: %w", path, v+1, err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version, applied_at) VALUES (?, ?)`,
		v+1, time.Now().UTC().Format(time.RFC3339Nano)); err != nil {
		return false, fmt.Errorf("state: migrate %s to version %d: %w", path, v+1, err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("state: migrate %s to version %d: %w", path, v+1, err)
	}
	return false, nil
}

type querier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func schemaVersion(ctx context.Context, q querier) (int, error) {
	var v int
	err := q.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v)
	return v, err
}
