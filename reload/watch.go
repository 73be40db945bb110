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
// It watches directories, not only the file: editors save by writing a
// temporary file and renaming it over the original, and Kubernetes
// updates a ConfigMap volume by swapping the "..data" symlink, and in
// both cases a watch on the old inode alone would go quiet forever. Every
// symlink on the way to the file is followed and the directory holding
// it watched, as are the file's directory and its parent, and the file
// itself (watched anew whenever it is replaced); events for other names
// (the SQLite database usually lives next to the config) are ignored.
// A burst of events is coalesced into one reload after Options.Debounce
// of quiet; a reload whose file parses to the same content as the one
// serving does nothing.
func (m *Manager) Watch(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	// The directories to watch and the names in them that matter are
	// worked out from the path as it resolves now, and again before every
	// reload: a symlink swap (Kubernetes' ..data, `ln -sfn` of the file
	// or of a directory on its path) or a directory deleted and made
	// again changes which directories must be watched.
	names, err := m.watchPaths(w, true)
	if err != nil {
		return err
	}

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
			// Chmod counts too: a file the last reload could not read
			// may just have been made readable. An unchanged file is
			// recognised by its hash and costs a parse.
			if !names[filepath.Clean(ev.Name)] {
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
			names, _ = m.watchPaths(w, false)
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

// watchPaths resolves the config path and makes w watch every directory
// whose entries decide what the path reads: the one holding each
// symlink met on the way, the one holding the file, and that one's
// parent (so a deleted and re-made directory is seen). The file itself
// is watched too: a write made through another name of it (a hard link,
// or the host's path of a file bind-mounted into a container) is
// reported to watches on the file and on the directory it was opened
// through, not to the config's directory. It returns the set of paths
// (real paths, as fsnotify names events) whose changes matter. Watches
// no longer needed are removed. On the initial call a failure to watch
// the file's own directory is returned; later failures are logged and
// retried at the next event.
func (m *Manager) watchPaths(w *fsnotify.Watcher, initial bool) (map[string]bool, error) {
	names := map[string]bool{}
	watch := map[string]bool{}
	links, final, missing := resolveChain(m.opts.Path)
	for _, l := range links {
		names[l] = true
		watch[filepath.Dir(l)] = true
	}
	// The file, or the first component that does not exist (yet): watch
	// for it to change or appear, and for its directory to be replaced.
	end := final
	if missing != "" {
		end = missing
	}
	d := filepath.Dir(end)
	names[end], names[d] = true, true
	watch[d], watch[filepath.Dir(d)] = true, true
	if final != "" {
		watch[final] = true
	}
	var fileDirErr error
	for p := range watch {
		if err := w.Add(p); err != nil {
			if final != "" && p == filepath.Dir(final) {
				fileDirErr = err
			}
			m.log.Debug("watching config path", "path", p, "err", err)
		}
	}
	for _, p := range w.WatchList() {
		if !watch[p] {
			w.Remove(p)
		}
	}
	if initial && fileDirErr != nil {
		return names, fileDirErr
	}
	return names, nil
}

// resolveChain follows path the way the kernel does, component by
// component. It returns every symlink met (as real directory + name),
// the resolved file, and, when a component does not exist, the real path
// of that component instead of a resolved file.
func resolveChain(path string) (links []string, final, missing string) {
	// Not filepath.Abs: it cleans the path, and a lexical clean takes
	// "link/.." for "." where the kernel goes to the parent of link's
	// target.
	abs := path
	if !filepath.IsAbs(path) {
		wd, err := os.Getwd()
		if err != nil {
			return nil, filepath.Clean(path), ""
		}
		abs = wd + string(filepath.Separator) + path
	}
	resolved := string(filepath.Separator)
	rest := strings.Split(abs, string(filepath.Separator))
	for hops := 0; len(rest) > 0; {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			resolved = filepath.Dir(resolved)
			continue
		}
		next := filepath.Join(resolved, c)
		fi, err := os.Lstat(next)
		if err != nil {
			return links, "", next
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			resolved = next
			continue
		}
		links = append(links, next)
		if hops++; hops > 40 {
			return links, "", next
		}
		target, err := os.Readlink(next)
		if err != nil {
			return links, "", next
		}
		if filepath.IsAbs(target) {
			resolved = string(filepath.Separator)
		}
		rest = append(strings.Split(target, string(filepath.Separator)), rest...)
	}
	return links, resolved, ""
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
