package state

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mattn/go-sqlite3"
	"go.uber.org/goleak"

	"github.com/portcullis/portcullis/config"
)

func TestMain(m *testing.M) {
	// The durability test re-executes this binary as the process it kills.
	if db := os.Getenv(helperEnv); db != "" {
		os.Exit(durabilityHelper(db))
	}
	// A Store that is not closed leaves database/sql's opener goroutine.
	goleak.VerifyTestMain(m)
}

func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// rawDB opens path without the store, to look at what it wrote.
func rawDB(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite3", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// schemaDump is everything a migration could change: the DDL of every
// object and the version rows.
func schemaDump(t *testing.T, path string) string {
	t.Helper()
	db := rawDB(t, path)
	defer db.Close()
	var b strings.Builder
	for _, q := range []string{
		`SELECT type || ' ' || name || ' ' || COALESCE(sql, '') FROM sqlite_master ORDER BY type, name`,
		`SELECT version || ' ' || applied_at FROM schema_version ORDER BY version`,
	} {
		rows, err := db.Query(q)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var s string
			if err := rows.Scan(&s); err != nil {
				t.Fatal(err)
			}
			b.WriteString(s + "\n")
		}
		if err := rows.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

func TestOpenFromEmpty(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if s.Path() != path {
		t.Errorf("Path() = %q, want %q", s.Path(), path)
	}
	ctx := context.Background()
	v, err := schemaVersion(ctx, s.db)
	if err != nil || v != len(migrations) {
		t.Fatalf("schema version = %d, %v; want %d", v, err, len(migrations))
	}
	// The pragmas come from the DSN, so every pooled connection has them;
	// check on a pinned connection of each pool.
	for _, pool := range []struct {
		name string
		db   *sql.DB
	}{{"writer", s.db}, {"reader", s.rdb}} {
		conn, err := pool.db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []struct{ pragma, want string }{
			{"journal_mode", "wal"},
			{"synchronous", "2"}, // FULL
			{"foreign_keys", "1"},
			{"busy_timeout", "5000"},
		} {
			var got string
			if err := conn.QueryRowContext(ctx, "PRAGMA "+p.pragma).Scan(&got); err != nil {
				t.Fatal(err)
			}
			if got != p.want {
				t.Errorf("%s: PRAGMA %s = %s, want %s", pool.name, p.pragma, got, p.want)
			}
		}
		conn.Close()
	}
	o, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Routes)+len(o.Firewall)+len(o.Listeners) != 0 {
		t.Errorf("new store has overrides: %+v", o)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Opening again (twice) changes nothing.
	before := schemaDump(t, path)
	for i := 0; i < 2; i++ {
		s, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		if after := schemaDump(t, path); after != before {
			t.Fatalf("reopen %d changed the schema:\n%s\nwant\n%s", i+1, after, before)
		}
	}
}

func TestOpenUpgradesOlderSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	old, err := openAt(path, 1)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if v, _ := schemaVersion(ctx, old.db); v != 1 {
		t.Fatalf("openAt(1): version %d", v)
	}
	// Rows as a version-1 binary wrote them: no actor column yet.
	for _, q := range []string{
		`INSERT INTO route_override (listener, sni, deleted, route, updated_at)
			VALUES ('public', 'app.example.com', 0, '{"sni":"app.example.com","backend":"10.0.0.1:443"}', '2024-01-02T03:04:05Z')`,
		`INSERT INTO firewall_override (value, action, updated_at) VALUES ('192.0.2.0/24', 'add', '2024-01-02T03:04:05Z')`,
		`INSERT INTO listener_override (listener, setting, value, updated_at) VALUES ('public', 'max_connections', 7, '2024-01-02T03:04:05Z')`,
	} {
		if _, err := old.db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := old.db.Exec(`SELECT 1 FROM meta`); err == nil {
		t.Fatal("version 1 already has the meta table; the upgrade test tests nothing")
	}
	old.Close()

	ts := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	want := &Overrides{
		Routes: []RouteOverride{{Listener: "public", SNI: "app.example.com",
			Route: config.Route{SNI: "app.example.com", Backend: "10.0.0.1:443"}, UpdatedAt: ts}},
		Firewall:  []FirewallOverride{{Value: "192.0.2.0/24", UpdatedAt: ts}},
		Listeners: []ListenerOverride{{Listener: "public", MaxConnections: 7, UpdatedAt: ts}},
	}
	var dump string
	for i := 0; i < 2; i++ {
		s, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if v, _ := schemaVersion(ctx, s.db); v != len(migrations) {
			t.Errorf("after upgrade: version %d, want %d", v, len(migrations))
		}
		got, err := s.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("after upgrade:\n got %+v\nwant %+v", got, want)
		}
		// The tables version 2 added work.
		if err := s.SetFileHash(ctx, "abc"); err != nil {
			t.Fatal(err)
		}
		s.Close()
		if d := schemaDump(t, path); i == 0 {
			dump = d
		} else if d != dump {
			t.Errorf("second open after upgrade changed the schema:\n%s\nwant\n%s", d, dump)
		}
	}
}

func TestOpenNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.Exec(`INSERT INTO schema_version (version, applied_at) VALUES (99, 'later')`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = Open(path)
	want := fmt.Sprintf("state: database %s has schema version 99, this binary knows up to %d", path, len(migrations))
	if err == nil || err.Error() != want {
		t.Fatalf("Open = %v, want %q", err, want)
	}
}

func TestOpenBadPath(t *testing.T) {
	dir := t.TempDir()
	notDB := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(notDB, bytes.Repeat([]byte("not a database\n"), 100), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, path, want string
	}{
		{"empty", "", "state: open: empty database path"},
		{"missing directory", filepath.Join(dir, "nope", "state.db"), "unable to open database file"},
		{"directory", dir, "unable to open database file"},
		{"not a database", notDB, "file is not a database"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Open(tc.path)
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.HasPrefix(err.Error(), "state: ") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Open = %q, want it to start with \"state: \" and mention %q", err, tc.want)
			}
			if tc.path != "" && !strings.Contains(err.Error(), tc.path) {
				t.Errorf("Open = %q, want it to name %s", err, tc.path)
			}
		})
	}
}

// TestOpenUnwritableDirectory: a database that cannot be created for
// want of permission (a service user's state directory owned by root)
// says so, not "no such file or directory", which is what SQLite
// reports after retrying read-only. chmod does not bite for root, so
// as root the test uses /sys, where no one may create files.
func TestOpenUnwritableDirectory(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(dir, 0o700) })
	if os.Geteuid() == 0 {
		dir = "/sys"
	}
	path := filepath.Join(dir, "portcullis-state-test.db")
	if f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err == nil {
		f.Close()
		os.Remove(path)
		t.Skipf("%s is writable here", dir)
	} else if !errors.Is(err, os.ErrPermission) {
		t.Skipf("creating in %s: %v, not a permission error", dir, err)
	}
	s, err := Open(path)
	if err == nil {
		s.Close()
		t.Fatal("Open succeeded")
	}
	if !strings.HasPrefix(err.Error(), "state: ") || !strings.Contains(err.Error(), path) || !errors.Is(err, os.ErrPermission) {
		t.Errorf("Open = %q, want a \"state: \" permission error naming %s", err, path)
	}
}

// TestOpenCreatesPrivateFiles: a new database, and the -wal and -shm
// files SQLite gives the database's mode, are readable by their owner
// only, like the admin socket and the backup copies: overrides are
// operator data. SQLite alone creates them 0644 less the umask, so the
// test sets the common umask 022.
func TestOpenCreatesPrivateFiles(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mustPut(t, s, 1)
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			t.Errorf("%s: mode %v, want no access for group and others", filepath.Base(p), perm)
		}
	}
}

func TestOpenPathNeedingEscape(t *testing.T) {
	// '?', '#' and '%' mean something in a file: URI.
	dir := filepath.Join(t.TempDir(), "odd?dir#x%41")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.PutListener(context.Background(), ListenerOverride{Listener: "a", MaxConnections: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database not at the literal path: %v", err)
	}
}

func TestRouteOverrides(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	ts := time.Date(2025, 5, 6, 7, 8, 9, 123456789, time.FixedZone("X", 3600))
	l7 := config.Route{SNI: "api.example.com", Mode: config.ModeL7, Backend: "10.0.0.6:8080",
		TLSCert: "c.pem", TLSKey: "k.pem", BackendProtocol: config.BackendH2,
		ResponseTimeout: config.Duration(90 * time.Second)}
	puts := []RouteOverride{
		{Listener: "public", SNI: "App.Example.com.", Route: config.Route{Backend: "10.0.0.1:443", SendProxyProtocol: true}, Actor: "uid:1000"},
		{Listener: "public", SNI: "api.example.com", Route: l7, Actor: "CN=ops", UpdatedAt: ts},
		// A tombstone's route is not stored.
		{Listener: "internal", SNI: "*", Deleted: true, Route: config.Route{Backend: "ignored:1"}, Actor: "uid:0", UpdatedAt: ts},
	}
	start := time.Now().UTC()
	for _, p := range puts {
		if err := s.PutRoute(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	o, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Routes) != 3 {
		t.Fatalf("Load: %d routes, want 3: %+v", len(o.Routes), o.Routes)
	}
	stamped := o.Routes[2].UpdatedAt
	if stamped.Before(start.Add(-time.Second)) || stamped.After(time.Now().Add(time.Second)) || stamped.Location() != time.UTC {
		t.Errorf("zero UpdatedAt stored as %v, want about now, UTC", stamped)
	}
	want := []RouteOverride{
		{Listener: "internal", SNI: "*", Deleted: true, Actor: "uid:0", UpdatedAt: ts.UTC()},
		{Listener: "public", SNI: "api.example.com", Route: l7, Actor: "CN=ops", UpdatedAt: ts.UTC()},
		{Listener: "public", SNI: "app.example.com", Route: config.Route{SNI: "app.example.com", Backend: "10.0.0.1:443", SendProxyProtocol: true}, Actor: "uid:1000", UpdatedAt: stamped},
	}
	if !reflect.DeepEqual(o.Routes, want) {
		t.Errorf("Load:\n got %+v\nwant %+v", o.Routes, want)
	}

	// Upsert: the value becomes a tombstone, any spelling of the SNI.
	if err := s.PutRoute(ctx, RouteOverride{Listener: "public", SNI: "APP.example.com", Deleted: true, Actor: "uid:2"}); err != nil {
		t.Fatal(err)
	}
	o, _ = s.Load(ctx)
	if got := o.Routes[2]; len(o.Routes) != 3 || !got.Deleted || got.Route != (config.Route{}) || got.Actor != "uid:2" {
		t.Errorf("after upsert: %+v", o.Routes)
	}

	// Clear, and ErrNotFound once it is gone.
	if err := s.ClearRoute(ctx, "public", "app.example.com."); err != nil {
		t.Fatal(err)
	}
	if err := s.ClearRoute(ctx, "public", "app.example.com"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second ClearRoute = %v, want ErrNotFound", err)
	}
	if err := s.ClearRoute(ctx, "nope", "api.example.com"); !errors.Is(err, ErrNotFound) {
		t.Errorf("ClearRoute(other listener) = %v, want ErrNotFound", err)
	}
	o, _ = s.Load(ctx)
	if len(o.Routes) != 2 {
		t.Errorf("after clear: %+v", o.Routes)
	}

	for _, bad := range []RouteOverride{
		{SNI: "a.example.com"},
		{Listener: "public"},
		{Listener: "public", SNI: ".", Deleted: true},
		{Listener: "public", SNI: "a.example.com", Route: config.Route{SNI: "b.example.com"}},
	} {
		if err := s.PutRoute(ctx, bad); err == nil || !strings.HasPrefix(err.Error(), "state: ") {
			t.Errorf("PutRoute(%+v) = %v, want a state: error", bad, err)
		}
	}
}

func TestFirewallOverrides(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	for _, p := range []FirewallOverride{
		{Value: "198.51.100.7", Actor: "a"},
		{Value: "2001:db8:bad::/48", Remove: true, Actor: "b"},
		{Value: "192.0.2.0/24", Actor: "c"},
		{Value: "::ffff:198.51.100.7", Remove: true}, // same key as the first: upsert
	} {
		if err := s.PutFirewall(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	o, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range o.Firewall {
		got = append(got, fmt.Sprintf("%s remove=%v actor=%q", f.Value, f.Remove, f.Actor))
	}
	want := []string{
		`192.0.2.0/24 remove=false actor="c"`,
		`198.51.100.7/32 remove=true actor=""`,
		`2001:db8:bad::/48 remove=true actor="b"`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Load:\n got %q\nwant %q", got, want)
	}
	if err := s.PutFirewall(ctx, FirewallOverride{Value: "not-an-ip"}); err == nil || !strings.HasPrefix(err.Error(), "state: ") {
		t.Errorf("PutFirewall(bad) = %v", err)
	}
	if err := s.ClearFirewall(ctx, "198.51.100.7"); err != nil {
		t.Fatal(err)
	}
	if err := s.ClearFirewall(ctx, "198.51.100.7/32"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second ClearFirewall = %v, want ErrNotFound", err)
	}
	if err := s.ClearFirewall(ctx, "bad"); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("ClearFirewall(bad) = %v, want a parse error", err)
	}
}

func TestListenerOverrides(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	for _, p := range []ListenerOverride{
		{Listener: "public", MaxConnections: 100, Actor: "a"},
		{Listener: "internal", MaxConnections: 0, Actor: "b"},
		{Listener: "public", MaxConnections: 5, Actor: "c"},
	} {
		if err := s.PutListener(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	o, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Listeners) != 2 ||
		o.Listeners[0].Listener != "internal" || o.Listeners[0].MaxConnections != 0 ||
		o.Listeners[1].Listener != "public" || o.Listeners[1].MaxConnections != 5 || o.Listeners[1].Actor != "c" {
		t.Errorf("Load: %+v", o.Listeners)
	}
	for _, bad := range []ListenerOverride{{MaxConnections: 1}, {Listener: "x", MaxConnections: -1}} {
		if err := s.PutListener(ctx, bad); err == nil || !strings.HasPrefix(err.Error(), "state: ") {
			t.Errorf("PutListener(%+v) = %v", bad, err)
		}
	}
	if err := s.ClearListener(ctx, "public"); err != nil {
		t.Fatal(err)
	}
	err = s.ClearListener(ctx, "public")
	if !errors.Is(err, ErrNotFound) || err.Error() != `state: override not found: listener override "public"` {
		t.Errorf("second ClearListener = %v, want ErrNotFound", err)
	}
}

func TestClearAllAndFileHash(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if h, err := s.FileHash(ctx); h != "" || err != nil {
		t.Errorf("FileHash on a new store = %q, %v", h, err)
	}
	if err := s.SetFileHash(ctx, "h1"); err != nil {
		t.Fatal(err)
	}
	if err := s.SetFileHash(ctx, "h2"); err != nil {
		t.Fatal(err)
	}
	if h, err := s.FileHash(ctx); h != "h2" || err != nil {
		t.Errorf("FileHash = %q, %v; want h2", h, err)
	}
	if n, err := s.ClearAll(ctx); n != 0 || err != nil {
		t.Errorf("ClearAll on empty = %d, %v", n, err)
	}
	mustPut(t, s, 1)
	mustPut(t, s, 2)
	if n, err := s.ClearAll(ctx); n != 6 || err != nil {
		t.Errorf("ClearAll = %d, %v; want 6", n, err)
	}
	o, _ := s.Load(ctx)
	if len(o.Routes)+len(o.Firewall)+len(o.Listeners) != 0 {
		t.Errorf("after ClearAll: %+v", o)
	}
	if h, _ := s.FileHash(ctx); h != "h2" {
		t.Errorf("ClearAll dropped the file hash: %q", h)
	}
}

func TestOverridesClone(t *testing.T) {
	var nilO *Overrides
	if nilO.Clone() != nil {
		t.Error("nil.Clone() != nil")
	}
	o := &Overrides{
		Routes:    []RouteOverride{{Listener: "a", SNI: "x"}},
		Firewall:  []FirewallOverride{{Value: "192.0.2.1/32"}},
		Listeners: []ListenerOverride{{Listener: "a", MaxConnections: 1}},
	}
	c := o.Clone()
	if !reflect.DeepEqual(c, o) {
		t.Fatal("clone differs")
	}
	c.Routes[0].SNI, c.Firewall[0].Value, c.Listeners[0].MaxConnections = "y", "z", 2
	if o.Routes[0].SNI != "x" || o.Firewall[0].Value != "192.0.2.1/32" || o.Listeners[0].MaxConnections != 1 {
		t.Error("clone shares memory with the original")
	}
}

func TestBackup(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	mustPut(t, s, 1)
	mustPut(t, s, 2)
	var buf bytes.Buffer
	n, err := s.Backup(ctx, &buf)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(buf.Len()) || n == 0 {
		t.Fatalf("Backup = %d bytes, wrote %d", n, buf.Len())
	}
	// The staging copy is gone.
	if m, _ := filepath.Glob(filepath.Join(filepath.Dir(s.Path()), ".portcullis-backup-*")); len(m) != 0 {
		t.Errorf("staging files left behind: %v", m)
	}

	out := filepath.Join(t.TempDir(), "backup.db")
	if err := os.WriteFile(out, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	db := rawDB(t, out)
	var routes, version int
	if err := db.QueryRow(`SELECT COUNT(*) FROM route_override WHERE sni IN ('k1.example.com', 'k2.example.com')`).Scan(&routes); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRow(`SELECT MAX(version) FROM schema_version`).Scan(&version); err != nil {
		t.Fatal(err)
	}
	if routes != 2 || version != len(migrations) {
		t.Errorf("backup has %d routes, version %d", routes, version)
	}
	db.Close()

	// The backup is a store in its own right.
	b, err := Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	got, err := b.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := s.Load(ctx)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("backup loads\n%+v\nwant\n%+v", got, want)
	}
}

func TestConcurrentPuts(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	const n = 50
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		errs  = make(chan error, n)
	)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs <- put(ctx, s, i)
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	o, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Routes) != n || len(o.Firewall) != n || len(o.Listeners) != n {
		t.Errorf("landed: %d routes, %d firewall, %d listeners; want %d each", len(o.Routes), len(o.Firewall), len(o.Listeners), n)
	}
}

// TestWriteFailures checks that a write the database refuses surfaces as
// an error and changes nothing. Tests run as root, where chmod does not
// make a file read-only, so the read-only case opens the file with
// SQLite's mode=ro (openReadOnly) instead.
func TestWriteFailures(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	mustPut(t, s, 7)
	want, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	ro, err := openReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	closed, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()

	for _, tc := range []struct {
		name  string
		s     *Store
		check func(error) bool
	}{
		{"read-only", ro, func(err error) bool {
			var se sqlite3.Error
			return errors.As(err, &se) && se.Code == sqlite3.ErrReadonly
		}},
		{"closed", closed, func(err error) bool { return strings.Contains(err.Error(), "database is closed") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := map[string]error{
				"PutRoute":    tc.s.PutRoute(ctx, RouteOverride{Listener: "l", SNI: "x.example.com", Route: config.Route{Backend: "b:1"}}),
				"PutFirewall": tc.s.PutFirewall(ctx, FirewallOverride{Value: "192.0.2.9"}),
				"PutListener": tc.s.PutListener(ctx, ListenerOverride{Listener: "l", MaxConnections: 9}),
				"ClearRoute":  tc.s.ClearRoute(ctx, "l-k7", "k7.example.com"),
				"SetFileHash": tc.s.SetFileHash(ctx, "x"),
			}
			_, calls["ClearAll"] = tc.s.ClearAll(ctx)
			for name, err := range calls {
				if err == nil {
					t.Errorf("%s succeeded", name)
					continue
				}
				if !strings.HasPrefix(err.Error(), "state: ") || !tc.check(err) || errors.Is(err, ErrNotFound) {
					t.Errorf("%s = %v (%T)", name, err, errors.Unwrap(err))
				}
			}
		})
	}
	ro.Close()

	fresh, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	got, err := fresh.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("failed writes changed the store:\n got %+v\nwant %+v", got, want)
	}
}

func TestLoadRejectsUnknownRouteField(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if _, err := s.db.Exec(`INSERT INTO route_override (listener, sni, deleted, route, actor, updated_at)
		VALUES ('l', 'a.example.com', 0, '{"sni":"a.example.com","backend":"b:1","from_the_future":true}', '', '2024-01-01T00:00:00Z')`); err != nil {
		t.Fatal(err)
	}
	_, err := s.Load(ctx)
	if err == nil || !strings.Contains(err.Error(), "from_the_future") || !strings.Contains(err.Error(), `route override listener "l" sni "a.example.com"`) {
		t.Errorf("Load = %v, want an error naming the row and the field", err)
	}
}

// put writes one override of each kind, all derived from i.
func put(ctx context.Context, s *Store, i int) error {
	k := fmt.Sprintf("k%d", i)
	if err := s.PutRoute(ctx, RouteOverride{Listener: "l-" + k, SNI: k + ".example.com", Route: config.Route{Backend: "10.0.0.1:443"}, Actor: k}); err != nil {
		return err
	}
	ip := fmt.Sprintf("10.%d.%d.%d", i>>16&0xff, i>>8&0xff, i&0xff)
	if err := s.PutFirewall(ctx, FirewallOverride{Value: ip, Actor: k}); err != nil {
		return err
	}
	return s.PutListener(ctx, ListenerOverride{Listener: "l-" + k, MaxConnections: i, Actor: k})
}

func mustPut(t *testing.T, s *Store, i int) {
	t.Helper()
	if err := put(context.Background(), s, i); err != nil {
		t.Fatal(err)
	}
}
