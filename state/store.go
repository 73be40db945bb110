package state

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/portcullis/portcullis/config"
)

const (
	actionAdd    = "add"
	actionRemove = "remove"

	settingMaxConnections = "max_connections"

	metaFileHash = "file_hash"
)

// Load reads every override in one transaction, so it never sees half of
// a ClearAll.
func (s *Store) Load(ctx context.Context) (*Overrides, error) {
	o := &Overrides{}
	tx, err := s.rdb.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err == nil {
		defer tx.Rollback()
		if o.Routes, err = loadRoutes(ctx, tx); err == nil {
			if o.Firewall, err = loadFirewall(ctx, tx); err == nil {
				o.Listeners, err = loadListeners(ctx, tx)
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("state: load %s: %w", s.path, err)
	}
	return o, nil
}

func loadRoutes(ctx context.Context, tx *sql.Tx) ([]RouteOverride, error) {
	rows, err := tx.QueryContext(ctx, `SELECT listener, sni, deleted, route, actor, updated_at
		FROM route_override ORDER BY listener, sni`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []RouteOverride
	for rows.Next() {
		var (
			r       RouteOverride
			route   sql.NullString
			updated string
		)
		if err := rows.Scan(&r.Listener, &r.SNI, &r.Deleted, &route, &r.Actor, &updated); err != nil {
			return nil, err
		}
		if r.UpdatedAt, err = parseTime(updated); err != nil {
			return nil, fmt.Errorf("route override listener %q sni %q: %w", r.Listener, r.SNI, err)
		}
		if !r.Deleted {
			if r.Route, err = decodeRoute(route.String); err != nil {
				return nil, fmt.Errorf("route override listener %q sni %q: %w", r.Listener, r.SNI, err)
			}
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func loadFirewall(ctx context.Context, tx *sql.Tx) ([]FirewallOverride, error) {
	rows, err := tx.QueryContext(ctx, `SELECT value, action, actor, updated_at
		FROM firewall_override ORDER BY value`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []FirewallOverride
	for rows.Next() {
		var (
			f               FirewallOverride
			action, updated string
		)
		if err := rows.Scan(&f.Value, &action, &f.Actor, &updated); err != nil {
			return nil, err
		}
		f.Remove = action == actionRemove
		if f.UpdatedAt, err = parseTime(updated); err != nil {
			return nil, fmt.Errorf("firewall override %q: %w", f.Value, err)
		}
		out = append(out, f)
	}
	return out, rows.Err()
}

func loadListeners(ctx context.Context, tx *sql.Tx) ([]ListenerOverride, error) {
	rows, err := tx.QueryContext(ctx, `SELECT listener, value, actor, updated_at
		FROM listener_override WHERE setting = ? ORDER BY listener`, settingMaxConnections)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []ListenerOverride
	for rows.Next() {
		var (
			l       ListenerOverride
			updated string
		)
		if err := rows.Scan(&l.Listener, &l.MaxConnections, &l.Actor, &updated); err != nil {
			return nil, err
		}
		if l.UpdatedAt, err = parseTime(updated); err != nil {
			return nil, fmt.Errorf("listener override %q: %w", l.Listener, err)
		}
		out = append(out, l)
	}
	return out, rows.Err()
}

// PutRoute inserts or replaces the route override for (Listener, SNI).
// It stores what it is given: checking the route against the would-be
// effective config is the caller's job, before calling Put.
func (s *Store) PutRoute(ctx context.Context, o RouteOverride) error {
	sni := config.NormalizeSNI(o.SNI)
	if o.Listener == "" || sni == "" {
		return fmt.Errorf("state: put route override: listener and sni are required (got %q, %q)", o.Listener, o.SNI)
	}
	var route sql.NullString
	if !o.Deleted {
		if o.Route.SNI != "" && config.NormalizeSNI(o.Route.SNI) != sni {
			return fmt.Errorf("state: put route override listener %q sni %q: route sni %q differs from the key", o.Listener, sni, o.Route.SNI)
		}
		r := o.Route
		r.SNI = sni
		b, err := json.Marshal(r)
		if err != nil {
			return fmt.Errorf("state: put route override listener %q sni %q: %w", o.Listener, sni, err)
		}
		route = sql.NullString{String: string(b), Valid: true}
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO route_override (listener, sni, deleted, route, actor, updated_at)
		VALUES (?, ?, ?, ?, ?, ?)
		ON CONFLICT (listener, sni) DO UPDATE SET
			deleted = excluded.deleted, route = excluded.route,
			actor = excluded.actor, updated_at = excluded.updated_at`,
		o.Listener, sni, o.Deleted, route, o.Actor, stamp(o.UpdatedAt))
	if err != nil {
		return fmt.Errorf("state: put route override listener %q sni %q: %w", o.Listener, sni, err)
	}
	return nil
}

// PutFirewall inserts or replaces the override for Value. Values are
// stored as normalised prefixes, so "192.0.2.1" and "192.0.2.1/32" are
// one key.
func (s *Store) PutFirewall(ctx context.Context, o FirewallOverride) error {
	value, err := normalizePrefix(o.Value)
	if err != nil {
		return fmt.Errorf("state: put firewall override: %w", err)
	}
	action := actionAdd
	if o.Remove {
		action = actionRemove
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO firewall_override (value, action, actor, updated_at)
		VALUES (?, ?, ?, ?)
		ON CONFLICT (value) DO UPDATE SET
			action = excluded.action, actor = excluded.actor, updated_at = excluded.updated_at`,
		value, action, o.Actor, stamp(o.UpdatedAt))
	if err != nil {
		return fmt.Errorf("state: put firewall override %q: %w", value, err)
	}
	return nil
}

// PutListener inserts or replaces the max_connections override of
// Listener.
func (s *Store) PutListener(ctx context.Context, o ListenerOverride) error {
	if o.Listener == "" {
		return errors.New("state: put listener override: listener is required")
	}
	if o.MaxConnections < 0 {
		return fmt.Errorf("state: put listener override %q: max_connections %d is negative", o.Listener, o.MaxConnections)
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO listener_override (listener, setting, value, actor, updated_at)
		VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (listener, setting) DO UPDATE SET
			value = excluded.value, actor = excluded.actor, updated_at = excluded.updated_at`,
		o.Listener, settingMaxConnections, o.MaxConnections, o.Actor, stamp(o.UpdatedAt))
	if err != nil {
		return fmt.Errorf("state: put listener override %q: %w", o.Listener, err)
	}
	return nil
}

// ClearRoute deletes the route override (value or tombstone) for
// (listener, sni), so the file's route, if any, is effective again.
func (s *Store) ClearRoute(ctx context.Context, listener, sni string) error {
	sni = config.NormalizeSNI(sni)
	return s.clear(ctx, fmt.Sprintf("route override listener %q sni %q", listener, sni),
		`DELETE FROM route_override WHERE listener = ? AND sni = ?`, listener, sni)
}

// ClearFirewall deletes the firewall override for value (any spelling of
// the same prefix).
func (s *Store) ClearFirewall(ctx context.Context, value string) error {
	v, err := normalizePrefix(value)
	if err != nil {
		return fmt.Errorf("state: clear firewall override: %w", err)
	}
	return s.clear(ctx, fmt.Sprintf("firewall override %q", v), `DELETE FROM firewall_override WHERE value = ?`, v)
}

// ClearListener deletes every setting override of listener.
func (s *Store) ClearListener(ctx context.Context, listener string) error {
	return s.clear(ctx, fmt.Sprintf("listener override %q", listener), `DELETE FROM listener_override WHERE listener = ?`, listener)
}

func (s *Store) clear(ctx context.Context, what, query string, args ...any) error {
	res, err := s.db.ExecContext(ctx, query, args...)
	if err != nil {
		return fmt.Errorf("state: clear %s: %w", what, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("state: clear %s: %w", what, err)
	}
	if n == 0 {
		return fmt.Errorf("%w: %s", ErrNotFound, what)
	}
	return nil
}

// ClearAll deletes every override in one transaction and reports how many
// there were. Meta data (the file hash) is kept.
func (s *Store) ClearAll(ctx context.Context) (int, error) {
	total := 0
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		for _, table := range []string{"route_override", "firewall_override", "listener_override"} {
			res, err := tx.ExecContext(ctx, `DELETE FROM `+table)
			if err != nil {
				return err
			}
			n, err := res.RowsAffected()
			if err != nil {
				return err
			}
			total += int(n)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("state: clear all overrides: %w", err)
	}
	return total, nil
}

// FileHash returns the config file hash recorded by SetFileHash, or ""
// when none has been recorded yet (a new database).
func (s *Store) FileHash(ctx context.Context) (string, error) {
	var h string
	err := s.rdb.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, metaFileHash).Scan(&h)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return "", nil
	case err != nil:
		return "", fmt.Errorf("state: read file hash: %w", err)
	}
	return h, nil
}

// SetFileHash records the config file's content hash.
func (s *Store) SetFileHash(ctx context.Context, h string) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES (?, ?)
		ON CONFLICT (key) DO UPDATE SET value = excluded.value`, metaFileHash, h)
	if err != nil {
		return fmt.Errorf("state: record file hash: %w", err)
	}
	return nil
}

func normalizePrefix(v string) (string, error) {
	p, err := config.ParsePrefix(v)
	if err != nil {
		return "", err
	}
	return p.String(), nil
}

// stamp is the stored form of t: the current time when t is zero (the
// usual case: the store dates what it writes), always UTC.
func stamp(t time.Time) string {
	if t.IsZero() {
		t = time.Now()
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func parseTime(s string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("updated_at: %w", err)
	}
	return t.UTC(), nil
}

// decodeRoute is strict: a field this binary does not know (written by a
// newer one) fails the load rather than silently serving a route without
// it, say without send_proxy_protocol.
func decodeRoute(s string) (config.Route, error) {
	var r config.Route
	dec := json.NewDecoder(bytes.NewReader([]byte(s)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return config.Route{}, fmt.Errorf("route: %w", err)
	}
	return r, nil
}
