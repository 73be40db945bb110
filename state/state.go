// Package state is the SQLite store behind runtime overrides: the changes
// an operator makes through the admin API, which win over the config file
// and survive restarts and file edits until cleared. It knows nothing of
// sockets or of how overrides are applied (that is reload.Merge):
//
//	st, err := state.Open(cfg.Resolve(cfg.State.Database))
//	if err != nil {
//		return err
//	}
//	defer st.Close()
//	err = st.PutRoute(ctx, state.RouteOverride{
//		Listener: "public", SNI: "app.example.com",
//		Route: config.Route{SNI: "app.example.com", Backend: "10.1.0.7:443"},
//		Actor: "uid:1000",
//	})
//	ov, err := st.Load(ctx) // everything, sorted, for the next merge
//
// A method returns only after SQLite has committed and synced the change,
// so an acknowledged mutation survives a crash of the process or the
// machine. Every error is prefixed "state: ".
package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver

	"github.com/portcullis/portcullis/config"
)

// ErrNotFound is returned by the Clear methods when there is no override
// with the given key.
var ErrNotFound = errors.New("state: override not found")

// RouteOverride sets (or, Deleted, hides) the route for SNI on a listener.
type RouteOverride struct {
	Listener string
	SNI      string // normalised by Put (config.NormalizeSNI)
	// Deleted makes this a tombstone: the file's route for SNI is hidden.
	Deleted bool
	// Route is the whole route; zero when Deleted. Its SNI is set to the
	// key's SNI by Put so the two cannot disagree.
	Route     config.Route
	Actor     string    // who: an mTLS subject, "uid:1000", ...
	UpdatedAt time.Time // UTC; Put stamps the current time when zero
}

// FirewallOverride adds a blocklist entry or removes a file one.
type FirewallOverride struct {
	Value     string // address or CIDR; Put stores the normalised prefix
	Remove    bool   // false: add to the blocklist; true: drop it from the file's
	Actor     string
	UpdatedAt time.Time
}

// ListenerOverride replaces a listener's max_connections.
type ListenerOverride struct {
	Listener       string
	MaxConnections int // 0 = unlimited, as in the file
	Actor          string
	UpdatedAt      time.Time
}

// Overrides is every override in the store. Routes are sorted by
// (Listener, SNI), Firewall by Value, Listeners by Listener, so two loads
// of the same data compare equal and merge the same way.
type Overrides struct {
	Routes    []RouteOverride
	Firewall  []FirewallOverride
	Listeners []ListenerOverride
}

// Clone returns a copy that shares no slice with o, so a caller can hand
// one out while editing the other.
func (o *Overrides) Clone() *Overrides {
	if o == nil {
		return nil
	}
	return &Overrides{
		Routes:    append([]RouteOverride(nil), o.Routes...),
		Firewall:  append([]FirewallOverride(nil), o.Firewall...),
		Listeners: append([]ListenerOverride(nil), o.Listeners...),
	}
}

// Store is an open override database. It is safe for concurrent use.
type Store struct {
	// db is the one writer connection: every mutation and migration.
	// Writers queue for it in database/sql (honouring their contexts)
	// rather than in SQLite's busy handler, which polls with growing
	// sleeps and gives up after busy_timeout; busy_timeout is left for
	// another process holding the lock.
	db *sql.DB
	// rdb serves Load, FileHash and Backup. In WAL mode they read a
	// snapshot and neither wait for nor hold up the writer.
	rdb  *sql.DB
	path string
}

// Open opens (creating if needed) the database at path and brings its
// schema up to date. The file stays in WAL mode so readers never block
// the writer.
func Open(path string) (*Store, error) {
	return openAt(path, len(migrations))
}

// openAt opens path and applies the first upTo migrations only; tests use
// it to build databases written by an older binary.
func openAt(path string, upTo int) (*Store, error) {
	s, err := open(path, false)
	if err != nil {
		return nil, err
	}
	if err := migrate(context.Background(), s.db, path, upTo); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// openReadOnly opens an existing, already migrated database with
// SQLite's mode=ro, so every write fails the way it would on a read-only
// file. Tests use it: they run as root, for whom chmod does not bite.
func openReadOnly(path string) (*Store, error) {
	return open(path, true)
}

func open(path string, readOnly bool) (*Store, error) {
	if path == "" {
		return nil, errors.New("state: open: empty database path")
	}
	if !readOnly {
		// SQLite creates a new database 0644 (less the umask), and its
		// -wal and -shm files with the database's mode, so every local
		// user could read the overrides. Create the file 0600 first, as
		// the admin socket and backup copies are: SQLite takes an empty
		// file for a new database. An existing file keeps its mode, and
		// a path that cannot be created is left for SQLite to report,
		// except when permission is what is missing: SQLite then retries
		// read-only and reports that attempt's "no such file or
		// directory", which sends the operator looking for a directory
		// that is there.
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		switch {
		case err == nil:
			f.Close()
		case errors.Is(err, os.ErrPermission) || errors.Is(err, syscall.EROFS):
			return nil, fmt.Errorf("state: %w", err)
		}
	}
	w, err := openDB(path, "_txlock=immediate", readOnly)
	if err != nil {
		return nil, err
	}
	w.SetMaxOpenConns(1)
	// Readers begin deferred transactions: a read snapshot, no write lock.
	// (Not query_only: SQLite counts VACUUM INTO, which Backup runs here,
	// as a write.)
	r, err := openDB(path, "_txlock=deferred", readOnly)
	if err != nil {
		w.Close()
		return nil, err
	}
	r.SetMaxOpenConns(4)
	return &Store{db: w, rdb: r, path: path}, nil
}

func openDB(path, opts string, readOnly bool) (*sql.DB, error) {
	dsn, err := dataSource(path, opts, readOnly)
	if err != nil {
		return nil, fmt.Errorf("state: open %s: %w", path, err)
	}
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		return nil, fmt.Errorf("state: open %s: %w", path, err)
	}
	// sql.Open connects lazily; connect now so a bad path (missing
	// directory, no permission, not a database) fails here with its own
	// message instead of on the first admin mutation.
	if err := db.Ping(); err != nil {
		db.Close()
		return nil, fmt.Errorf("state: open %s: %w", path, err)
	}
	return db, nil
}

// dataSource builds the go-sqlite3 DSN. Every pooled connection runs the
// same pragmas, which is why they live in the DSN and not in one Exec:
//   - WAL: readers (Load, Backup) never block a mutation.
//   - synchronous=FULL: with WAL, NORMAL already survives a killed process
//     but may lose the last commits on power loss; FULL syncs the WAL on
//     every commit. The store sees a handful of writes a day, so the
//     fsync is free and "acknowledged" means "on disk". (The driver would
//     otherwise lower WAL connections to NORMAL.)
//   - txlock=immediate (writer): a transaction takes the write lock at
//     BEGIN, so two writers (say, two processes) queue on busy_timeout
//     instead of one failing with SQLITE_BUSY when it upgrades a read lock
//     mid-transaction.
func dataSource(path, opts string, readOnly bool) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	// A file: URI, so the driver never mistakes a '?' in the path for
	// its options; SQLite decodes %HH in the path part.
	esc := strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23").Replace(filepath.ToSlash(abs))
	q := "_journal_mode=WAL&_synchronous=FULL&_foreign_keys=on&_busy_timeout=5000&" + opts
	if readOnly {
		q += "&mode=ro"
	}
	return "file:" + esc + "?" + q, nil
}

// Close closes the database. SQLite checkpoints the WAL into the main
// file when the last connection closes, so a cleanly stopped daemon
// leaves one self-contained file.
func (s *Store) Close() error {
	err := errors.Join(s.rdb.Close(), s.db.Close())
	if err != nil {
		return fmt.Errorf("state: close %s: %w", s.path, err)
	}
	return nil
}

// Path is the database path given to Open.
func (s *Store) Path() string { return s.path }

// inTx runs fn in a write transaction (BEGIN IMMEDIATE, see dataSource)
// and commits; any error rolls it back.
func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}
