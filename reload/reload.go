// Package reload turns the config file and the stored overrides into the
// snapshot the proxy serves, and keeps it current: on file changes, on
// SIGHUP, and after every admin mutation. Every path goes through one
// all-or-nothing sequence — parse, validate, merge, compile, open new
// sockets, swap, close removed sockets — so a failure anywhere leaves the
// running snapshot untouched.
//
//	m, err := reload.New(reload.Options{Path: "portcullis.toml", Server: srv, Store: store})
//	err = m.Start()           // first load; an error here is fatal
//	go m.Watch(ctx)           // file changes, debounced
//	err = m.Reload("sighup")  // explicit triggers
package reload

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/state"
)

// Options configure a Manager.
type Options struct {
	Path     string        // config file
	Server   *proxy.Server // where snapshots are published
	Store    *state.Store  // overrides; nil means none
	Logger   *slog.Logger
	Registry prometheus.Registerer // nil: a private registry
	// Debounce is how long the watcher waits for a burst of file events
	// to settle before reloading; 0 means DefaultDebounce.
	Debounce time.Duration
}

// DefaultDebounce coalesces the several events one editor save makes.
const DefaultDebounce = 100 * time.Millisecond

// Status is the outcome of the latest reload attempt.
type Status struct {
	Path        string
	Hash        string // hash of the file config now serving
	LastAttempt time.Time
	LastSuccess time.Time
	LastResult  string // "success", "failure" or "unchanged"
	LastError   string // with file:line:key when the file was at fault
	LastTrigger string
}

// Manager owns the path from config file and overrides to the published
// snapshot. Its methods are safe for concurrent use; reloads and
// mutations are serialised.
type Manager struct {
	opts    Options
	log     *slog.Logger
	metrics *metrics

	mu        sync.Mutex
	file      *config.Config   // the last file config that compiled
	started   *config.Config   // the file config of the start, whose [admin], [metrics] and [state] the daemon runs on
	fileHash  string           // file.Hash(), computed once
	overrides *state.Overrides // as stored
	eff       *Effective
	status    Status
}

// New makes a Manager. Nothing is loaded until Start.
func New(o Options) *Manager {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Registry == nil {
		o.Registry = prometheus.NewRegistry()
	}
	if o.Debounce <= 0 {
		o.Debounce = DefaultDebounce
	}
	return &Manager{opts: o, log: o.Logger, metrics: newMetrics(o.Registry), status: Status{Path: o.Path}}
}

// Start performs the first load. Its error is the operator's to fix
// before the daemon can run, so the caller should exit with it.
func (m *Manager) Start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	o := &state.Overrides{}
	if m.opts.Store != nil {
		var err error
		if o, err = m.opts.Store.Load(ctx); err != nil {
			return err
		}
	}
	m.overrides = o
	cfg, err := config.Load(m.opts.Path)
	if err != nil {
		return err
	}
	if err := m.publishAtStart(cfg, o); err != nil {
		return err
	}
	m.file, m.fileHash, m.started = cfg, cfg.Hash(), cfg
	m.record("startup", "success", nil)
	if m.opts.Store != nil {
		if h, err := m.opts.Store.FileHash(ctx); err == nil && h == "" {
			// The first start with an empty database records which file
			// it began from.
			if err := m.opts.Store.SetFileHash(ctx, m.fileHash); err != nil {
				m.log.Warn("recording config hash", "err", err)
			}
		}
	}
	return nil
}

// publishAtStart publishes file ⊕ o, leaving out any stored route
// override that can no longer be applied (its certificate was deleted
// while the daemon was down, say). Refusing to start over it would also
// keep down the admin API that can clear it. A route left out is logged
// and reported among the orphans; it stays stored, so every reload and
// mutation names it until it is fixed or cleared, as when one breaks
// while the daemon runs. Any other error stops the start.
func (m *Manager) publishAtStart(file *config.Config, o *state.Overrides) error {
	applied := o
	var left []Orphan
	for {
		err := m.publish(file, applied)
		if err == nil {
			break
		}
		listener, sni, ok := overrideAt(Merge(file, applied).Config, err)
		if !ok {
			return err
		}
		if applied == o {
			applied = o.Clone()
		}
		if !applied.RemoveRoute(listener, sni) {
			return err
		}
		m.log.Error("stored route override cannot be applied: starting without it; put it again or clear it with ctl",
			"listener", listener, "sni", sni, "err", err)
		left = append(left, Orphan{Kind: "route", Listener: listener, SNI: sni, Reason: err.Error()})
	}
	m.eff.Orphans = append(m.eff.Orphans, left...)
	return nil
}

// overrideAt finds the route override of c that err (a *config.Error)
// is about, by its key.
func overrideAt(c *config.Config, err error) (listener, sni string, ok bool) {
	var ce *config.Error
	if !errors.As(err, &ce) {
		return "", "", false
	}
	for li := range c.Listeners {
		for ri, r := range c.Listeners[li].Routes {
			if r.Source != "" {
				continue // the file's own route
			}
			if k := c.RouteKey(li, ri); ce.Key == k || strings.HasPrefix(ce.Key, k+".") {
				return c.Listeners[li].Name, r.SNI, true
			}
		}
	}
	return "", "", false
}

// Reload re-reads the config file and publishes it merged with the
// stored overrides. On any error the running snapshot stays, and the
// error (with file:line:key) is returned, logged, counted and kept for
// Status. trigger names the cause for logs and Status.
func (m *Manager) Reload(trigger string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.reloadLocked(trigger, false)
}

// reloadLocked does the work of Reload. skipUnchanged recognises a
// no-op: a file whose parsed content hashes the same as the one serving.
// Explicit triggers (SIGHUP, the admin call) always recompile, so they
// also pick up certificate files changed in place.
func (m *Manager) reloadLocked(trigger string, skipUnchanged bool) error {
	cfg, err := config.Load(m.opts.Path)
	if err != nil {
		m.record(trigger, "failure", err)
		return err
	}
	hash := cfg.Hash()
	if skipUnchanged && m.file != nil && hash == m.fileHash {
		m.record(trigger, "unchanged", nil)
		return nil
	}
	if err := m.publish(cfg, m.overrides); err != nil {
		m.record(trigger, "failure", err)
		return err
	}
	m.warnStartOnly(cfg)
	m.file, m.fileHash = cfg, hash
	m.record(trigger, "success", nil)
	return nil
}

// warnStartOnly says which sections of the file differ from what the
// daemon started with and so wait for a restart: [admin], [metrics] and
// [state] are read once, at start, and a reload that applies the rest
// would otherwise look as if it had applied them too. Every reload that
// still differs says so again.
func (m *Manager) warnStartOnly(next *config.Config) {
	prev := m.started
	if prev == nil {
		return
	}
	for _, s := range []struct {
		name string
		same bool
	}{
		{"admin", reflect.DeepEqual(prev.Admin, next.Admin)},
		{"metrics", reflect.DeepEqual(prev.Metrics, next.Metrics)},
		{"state", reflect.DeepEqual(prev.State, next.State)},
	} {
		if !s.same {
			m.log.Warn("config section changed: it takes effect at the next restart", "section", s.name)
		}
	}
}

// publish merges, validates, compiles and applies. m.mu is held.
func (m *Manager) publish(file *config.Config, o *state.Overrides) error {
	eff, snap, err := m.build(file, o)
	if err != nil {
		return err
	}
	if err := m.opts.Server.Apply(snap); err != nil {
		m.opts.Server.Discard(snap)
		return err
	}
	m.eff = eff
	return nil
}

// build computes the effective config and compiles it, publishing
// nothing. It is the validation step of an admin mutation too.
func (m *Manager) build(file *config.Config, o *state.Overrides) (*Effective, *proxy.Snapshot, error) {
	eff := Merge(file, o)
	if err := eff.Config.Validate(); err != nil {
		return nil, nil, err
	}
	snap, err := m.opts.Server.Compile(eff.Config)
	if err != nil {
		return nil, nil, err
	}
	return eff, snap, nil
}

// Mutate is the write-through path of the admin API. change edits a copy
// of the stored overrides; the would-be effective config is validated
// and compiled first, then write commits the same change to the
// database, and only then is the snapshot published. If validation or
// the write fails, memory and database are unchanged and the error is
// returned (validation errors wrap ErrRejected; an override set on a
// listener the file does not declare is ErrNoListener).
func (m *Manager) Mutate(ctx context.Context, change func(*state.Overrides) error, write func(context.Context, *state.Store) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.file == nil {
		return errors.New("reload: not started")
	}
	next := m.overrides.Clone()
	if err := change(next); err != nil {
		return err
	}
	// The admin API checks that the listener exists before this lock is
	// taken; a file reload in between may have removed it, and the
	// override would then be stored but never applied.
	if err := setsMissingListener(m.file, m.overrides, next); err != nil {
		return err
	}
	eff, snap, err := m.build(m.file, next)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrRejected, err)
	}
	// The write runs inside Apply, after the server has checked that it
	// is not shutting down: a server that refuses the snapshot (it is
	// draining) must not leave the change stored, to surface at the
	// next start after the caller was told it failed.
	commit := func() error {
		if m.opts.Store == nil {
			return nil
		}
		return write(ctx, m.opts.Store)
	}
	if err := m.opts.Server.ApplyWith(snap, commit); err != nil {
		m.opts.Server.Discard(snap)
		return err
	}
	m.overrides, m.eff = next, eff
	return nil
}

// ErrRejected marks a mutation the effective config does not accept.
var ErrRejected = errors.New("reload: rejected by the effective configuration")

// ErrNoListener marks a mutation that sets an override on a listener the
// config file does not declare.
var ErrNoListener = errors.New("reload: listener is not in the config file")

// setsMissingListener refuses a change that sets (or re-sets) a route or
// listener override on a listener file does not declare: it would be an
// orphan from the start. Overrides next keeps unchanged from prev, and
// clearing them, are allowed.
func setsMissingListener(file *config.Config, prev, next *state.Overrides) error {
	for _, r := range next.Routes {
		if file.Listener(r.Listener) == nil && !slices.Contains(prev.Routes, r) {
			return fmt.Errorf("%w: %q", ErrNoListener, r.Listener)
		}
	}
	for _, l := range next.Listeners {
		if file.Listener(l.Listener) == nil && !slices.Contains(prev.Listeners, l) {
			return fmt.Errorf("%w: %q", ErrNoListener, l.Listener)
		}
	}
	return nil
}

// Effective returns the effective config now serving, with origins.
func (m *Manager) Effective() *Effective {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.eff
}

// Overrides returns a copy of the stored overrides now applied.
func (m *Manager) Overrides() *state.Overrides {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.overrides.Clone()
}

// Status reports the latest reload attempt.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.status
}

func (m *Manager) record(trigger, result string, err error) {
	now := time.Now()
	failedBefore := m.status.LastResult == "failure"
	m.status.LastAttempt = now
	m.status.LastTrigger = trigger
	m.status.LastResult = result
	m.status.LastError = ""
	m.metrics.reloads.WithLabelValues(result).Inc()
	switch result {
	case "failure":
		m.status.LastError = err.Error()
		m.metrics.lastOK.Set(0)
		m.log.Error("reload failed; still serving the previous configuration", "trigger", trigger, "err", err)
	case "success":
		m.status.LastSuccess = now
		m.status.Hash = m.fileHash
		m.metrics.lastOK.Set(1)
		m.metrics.lastSuccess.Set(float64(now.UnixNano()) / 1e9)
		m.metrics.info.Reset()
		m.metrics.info.WithLabelValues(m.status.Hash).Set(1)
		m.log.Info("configuration loaded", "trigger", trigger, "hash", m.status.Hash[:12], "path", m.opts.Path)
	case "unchanged":
		m.metrics.lastOK.Set(1)
		if failedBefore {
			// The file is back to what is serving: say so where the
			// failure was said, or the error stays the last word.
			m.log.Info("configuration unchanged: the file matches the configuration serving again", "trigger", trigger, "hash", m.status.Hash[:12], "path", m.opts.Path)
		} else {
			m.log.Debug("configuration unchanged", "trigger", trigger)
		}
	}
}
