package reload

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/portcullis/portcullis/config"
)

// Watch reloads the config file whenever it changes, until ctx is done.
//
// It watches the file's directory, not the file: editors save by writing
// a temporary file and renaming it over the original, and Kubernetes
// updates a ConfigMap volume by swapping the "..data" symlink, and in
// both cases a watch on the old inode would go quiet forever. Events for
// other names in the directory (the SQLite database usually lives there)
// are ignored. A burst of events is coalesced into one reload after
// Options.Debounce of quiet; a reload whose file parses to the same
// content as the one serving does nothing.
func (m *Manager) Watch(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	dir := filepath.Dir(m.opts.Path)
	if err := w.Add(dir); err != nil {
		return err
	}
	// If the config is a symlink to a file in another directory, watch
	// that one as well so edits of the target are seen.
	target := m.watchTarget(w, dir, "")

	base := filepath.Base(m.opts.Path)
	// A change made between Start's load and the watch being set up
	// would otherwise wait for the next edit: check once now. An
	// unchanged file is recognised by its hash and costs nothing.
	timer := time.NewTimer(0)
	fire := timer.C
	first := true
	for {
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return nil
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			m.log.Warn("config watcher", "err", err)
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			if !m.relevant(ev, base, target) {
				continue
			}
			if timer == nil {
				timer = time.NewTimer(m.opts.Debounce)
				fire = timer.C
			} else {
				timer.Reset(m.opts.Debounce)
			}
		case <-fire:
			timer, fire = nil, nil
			target = m.watchTarget(w, dir, target)
			if _, err := os.Stat(m.opts.Path); errors.Is(err, fs.ErrNotExist) {
				// Between the delete and the re-create of some save
				// styles: not a failed reload, the create event follows.
				m.log.Warn("config file is missing; still serving the previous configuration", "path", m.opts.Path)
				continue
			}
			if first {
				first = false
				if !m.fileChanged() {
					continue // nothing happened: not worth a status line
				}
			}
			m.mu.Lock()
			m.reloadLocked("file", true)
			m.mu.Unlock()
		}
	}
}

// relevant reports whether an event may have changed the config file.
func (m *Manager) relevant(ev fsnotify.Event, base, target string) bool {
	if ev.Op == fsnotify.Chmod {
		return false
	}
	name := filepath.Base(ev.Name)
	if name == base || strings.HasPrefix(name, "..") { // "..data" and friends
		return true
	}
	return target != "" && filepath.Clean(ev.Name) == target
}

// watchTarget follows a symlinked config file to the directory of its
// target, adding a watch there when it is outside dir. It returns the
// resolved target path ("" when the config is not a symlink elsewhere).
func (m *Manager) watchTarget(w *fsnotify.Watcher, dir, prev string) string {
	resolved, err := filepath.EvalSymlinks(m.opts.Path)
	if err != nil {
		return prev
	}
	resolved = filepath.Clean(resolved)
	tdir := filepath.Dir(resolved)
	realDir, _ := filepath.EvalSymlinks(dir)
	if tdir == dir || tdir == realDir || strings.HasPrefix(filepath.Base(tdir), "..") {
		return "" // same directory, or a Kubernetes ..data layout
	}
	if prev != resolved {
		if prev != "" {
			w.Remove(filepath.Dir(prev))
		}
		if err := w.Add(tdir); err != nil {
			m.log.Warn("watching config symlink target", "dir", tdir, "err", err)
		}
	}
	return resolved
}

// fileChanged reports whether the file now parses to something other
// than the config serving (a broken or missing file counts as changed,
// so the reload reports it).
func (m *Manager) fileChanged() bool {
	cfg, err := config.Load(m.opts.Path)
	m.mu.Lock()
	defer m.mu.Unlock()
	return err != nil || m.file == nil || cfg.Hash() != m.fileHash
}
