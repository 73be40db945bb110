package reload

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testnet"
)

// TestWatchSymlinkToFileInSameDir: portcullis.toml -> portcullis.prod.toml
// in the same directory; editing the target must reload.
func TestWatchSymlinkToFileInSameDir(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	dir := t.TempDir()
	real := filepath.Join(dir, "portcullis.prod.toml")
	writeTo(t, real, appConfig(a))
	link := filepath.Join(dir, "portcullis.toml")
	if err := os.Symlink("portcullis.prod.toml", link); err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, dir: dir, path: link}
	r.start()
	r.await("l", "A")
	writeTo(t, real, appConfig(b))
	r.await("l", "B")
}

// TestWatchDirSymlinkSwap: the config's directory is a symlink swapped
// with `ln -sfn` (a release-directory deploy).
func TestWatchDirSymlinkSwap(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	root := t.TempDir()
	mk := func(name, backend string) {
		d := filepath.Join(root, name)
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		writeTo(t, filepath.Join(d, "portcullis.toml"), appConfig(backend))
	}
	mk("v1", a)
	cur := filepath.Join(root, "current")
	if err := os.Symlink("v1", cur); err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, dir: cur, path: filepath.Join(cur, "portcullis.toml")}
	r.start()
	r.await("l", "A")
	mk("v2", b)
	tmp := filepath.Join(root, "current.tmp")
	if err := os.Symlink("v2", tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, cur); err != nil { // what `ln -sfn v2 current` does atomically
		t.Fatal(err)
	}
	r.await("l", "B")
}

// TestWatchDirRecreated: the config directory is removed and recreated
// (a deploy that replaces the whole directory).
func TestWatchDirRecreated(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	root := t.TempDir()
	dir := filepath.Join(root, "etc")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, dir: dir, path: filepath.Join(dir, "portcullis.toml")}
	r.write(appConfig(a))
	r.start()
	r.await("l", "A")
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	// The directory is gone for a while (several debounce periods), as
	// during a real redeploy; then it comes back with a new file.
	time.Sleep(300 * time.Millisecond)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r.write(appConfig(b))
	r.await("l", "B")
}

// TestWatchFileSymlinkRetargeted: portcullis.toml -> /x/a.toml is
// swapped (`ln -sfn /y/b.toml portcullis.toml`), then /y/b.toml is
// edited in place and by a vim-style save: every change reloads.
func TestWatchFileSymlinkRetargeted(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	x, y, dir := t.TempDir(), t.TempDir(), t.TempDir()
	ta, tb := filepath.Join(x, "a.toml"), filepath.Join(y, "b.toml")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(ta, []byte(appConfig(a)), 0o644))
	must(os.WriteFile(tb, []byte(appConfig(b)), 0o644))
	link := filepath.Join(dir, "portcullis.toml")
	if err := os.Symlink(ta, link); err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, dir: dir, path: link}
	r.start()
	r.await("l", "A")
	tmp := filepath.Join(dir, ".tmp-link")
	must(os.Symlink(tb, tmp))
	must(os.Rename(tmp, link))
	r.await("l", "B")
	must(os.WriteFile(tb, []byte(appConfig(a)), 0o644))
	r.await("l", "A")
	// vim-style save of the new target: rename away, write anew.
	must(os.Rename(tb, tb+"~"))
	must(os.WriteFile(tb, []byte(appConfig(b)), 0o644))
	must(os.Remove(tb + "~"))
	r.await("l", "B")
}

// The config path "link/../portcullis.toml", where link is a symlink to
// a directory, names the file in the parent of link's target, as the
// kernel (and config.Load) resolve it, not the one next to link. Edits to
// the file the proxy actually loads must reload.
func TestWatchDotDotAfterSymlink(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	root := t.TempDir()
	sub := filepath.Join(root, "real", "sub")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	real := filepath.Join(root, "real", "portcullis.toml")
	writeTo(t, real, appConfig(a))
	if err := os.Symlink(filepath.Join("real", "sub"), filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	// Built by hand: filepath.Join would clean the ".." away.
	path := root + "/link/../portcullis.toml"
	r := &rig{t: t, dir: root, path: path}
	r.start()
	r.await("l", "A")
	writeTo(t, real, appConfig(b))
	r.await("l", "B")
}

// syncBuffer is a log sink safe for the watcher's goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The file is deleted (the watcher notices and keeps serving), then its
// whole directory is replaced by a new one holding a new file: the new
// file must be loaded, as it is when the directory is replaced while the
// file exists (TestWatchDirRecreated).
func TestWatchDirReplacedWhileFileMissing(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	root := t.TempDir()
	dir := filepath.Join(root, "etc")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "portcullis.toml")
	writeTo(t, path, appConfig(a))
	logs := &syncBuffer{}
	r := &rig{t: t, dir: dir, path: path, log: slog.New(slog.NewTextHandler(logs, nil))}
	r.start()
	r.await("l", "A")

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	testnet.WaitFor(t, "the watcher to notice the missing file", func() bool {
		return strings.Contains(logs.String(), "config file is missing")
	})
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeTo(t, path, appConfig(b))
	r.await("l", "B")
}

// TestWatchInPlaceWriteThroughAnotherName: the config file has another
// name — a hard link, or the host's path of a file bind-mounted into a
// container (`docker run -v $PWD/portcullis.toml:/etc/portcullis.toml`)
// — and is rewritten in place through that name. The kernel reports
// such a write to watches on the file itself and on the directory it was
// opened through, not to the config's directory.
func TestWatchInPlaceWriteThroughAnotherName(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	host, etc := t.TempDir(), t.TempDir()
	other := filepath.Join(host, "portcullis.toml")
	writeTo(t, other, appConfig(a))
	path := filepath.Join(etc, "portcullis.toml")
	if err := os.Link(other, path); err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, dir: etc, path: path}
	r.start()
	r.await("l", "A")
	for _, want := range []string{"B", "A"} {
		backend := map[string]string{"A": a, "B": b}[want]
		f, err := os.OpenFile(other, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString(appConfig(backend)); err != nil {
			t.Fatal(err)
		}
		f.Close()
		r.await("l", want)
	}
}

// TestWatchFileMadeReadable: a save that leaves the file unreadable to
// the daemon (`install -m 600` by root, a umask 077 shell) fails to
// load; the operator's `chmod 644` that follows changes no content, only
// the mode, and must load the file. (Root reads any file, so as root
// there is nothing to test.)
func TestWatchFileMadeReadable(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root reads files whatever their mode")
	}
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	r := newRig(t, appConfig(a))
	r.await("l", "A")
	tmp := filepath.Join(r.dir, "new.toml")
	if err := os.WriteFile(tmp, []byte(appConfig(b)), 0o200); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, r.path); err != nil {
		t.Fatal(err)
	}
	testnet.WaitFor(t, "the unreadable file to fail", func() bool { return r.count("failure") == 1 })
	if err := os.Chmod(r.path, 0o644); err != nil {
		t.Fatal(err)
	}
	r.await("l", "B")
}
