package reload

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/portcullis/portcullis/testnet"
)

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
	if err := os.WriteFile(real, []byte(appConfig(a)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join("real", "sub"), filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	// Built by hand: filepath.Join would clean the ".." away.
	path := root + "/link/../portcullis.toml"
	r := &rig{t: t, dir: root, path: path}
	r.start()
	r.await("l", "A")
	if err := os.WriteFile(real, []byte(appConfig(b)), 0o644); err != nil {
		t.Fatal(err)
	}
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
	if err := os.WriteFile(path, []byte(appConfig(a)), 0o644); err != nil {
		t.Fatal(err)
	}
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
	if err := os.WriteFile(path, []byte(appConfig(b)), 0o644); err != nil {
		t.Fatal(err)
	}
	r.await("l", "B")
}
