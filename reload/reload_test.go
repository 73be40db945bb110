package reload

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/state"
	"github.com/portcullis/portcullis/testnet"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// rig is a Manager serving a config file in a temp dir, with the file
// watcher running.
type rig struct {
	t     *testing.T
	dir   string
	path  string
	log   *slog.Logger // nil: discarded
	store *state.Store // nil: no overrides database
	srv   *proxy.Server
	m     *Manager
	hello []byte
}

func newRig(t *testing.T, cfg string) *rig {
	t.Helper()
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, path: filepath.Join(dir, "portcullis.toml")}
	r.write(cfg)
	r.start()
	return r
}

// start runs a Manager on r.path (which may be a symlink).
func (r *rig) start() {
	t := r.t
	r.srv = proxy.NewServer(proxy.Options{})
	r.m = New(Options{Path: r.path, Server: r.srv, Store: r.store, Debounce: 50 * time.Millisecond, Logger: r.log})
	if err := r.m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		// A watcher that could not start (no inotify instance to be
		// had) would otherwise leave a test waiting for a reload.
		if err := r.m.Watch(ctx); err != nil {
			t.Errorf("Watch: %v", err)
		}
	}()
	r.hello = testnet.ClientHello(t, &tls.Config{ServerName: "app.test"})
	t.Cleanup(func() {
		cancel()
		<-done
		sctx, c := context.WithTimeout(context.Background(), 5*time.Second)
		defer c()
		r.srv.Shutdown(sctx)
	})
}

func (r *rig) write(cfg string) {
	r.t.Helper()
	writeTo(r.t, r.path, cfg)
}

// writeTo writes content to path, in place if the file exists.
func writeTo(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (r *rig) count(result string) float64 {
	return testutil.ToFloat64(r.m.metrics.reloads.WithLabelValues(result))
}

func (r *rig) ask(listener string) string {
	a := r.srv.Addr(listener)
	got, err := testnet.Ask(a.String(), r.hello)
	if err != nil {
		return "error: " + err.Error()
	}
	return got
}

// await polls until the listener routes app.test to want.
func (r *rig) await(listener, want string) {
	r.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := r.ask(listener)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("routed to %q, want %q (status %+v)", got, want, r.m.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func appConfig(backend string) string {
	return fmt.Sprintf(`
[[listener]]
name = "l"
listen = "127.0.0.1:0"

  [[listener.route]]
  sni = "app.test"
  backend = %q
`, backend)
}

func TestTriggers(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")

	t.Run("in-place write", func(t *testing.T) {
		r := newRig(t, appConfig(a))
		r.await("l", "A")
		f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(appConfig(b))
		f.Close()
		r.await("l", "B")
	})
	t.Run("editor rename", func(t *testing.T) {
		r := newRig(t, appConfig(a))
		for i, want := range []string{"B", "A", "B"} { // keeps watching after each rename
			backend := map[string]string{"A": a, "B": b}[want]
			tmp := filepath.Join(r.dir, fmt.Sprintf(".portcullis.toml.swp%d", i))
			os.WriteFile(tmp, []byte(appConfig(backend)), 0o644)
			if err := os.Rename(tmp, r.path); err != nil {
				t.Fatal(err)
			}
			r.await("l", want)
		}
	})
	t.Run("delete and recreate", func(t *testing.T) {
		r := newRig(t, appConfig(a))
		os.Remove(r.path)
		time.Sleep(150 * time.Millisecond) // past the debounce: the file is missing for a while
		r.await("l", "A")                  // still serving
		if n := r.count("failure"); n != 0 {
			t.Fatalf("a missing file counted as %v failed reloads", n)
		}
		r.write(appConfig(b))
		r.await("l", "B")
	})
	t.Run("kubernetes configmap swap", func(t *testing.T) {
		dir := t.TempDir()
		mk := func(ts, backend string) {
			os.Mkdir(filepath.Join(dir, ts), 0o755)
			os.WriteFile(filepath.Join(dir, ts, "portcullis.toml"), []byte(appConfig(backend)), 0o644)
		}
		mk("..2026_11_26_01", a)
		os.Symlink("..2026_11_26_01", filepath.Join(dir, "..data"))
		os.Symlink("..data/portcullis.toml", filepath.Join(dir, "portcullis.toml"))
		r := &rig{t: t, dir: dir, path: filepath.Join(dir, "portcullis.toml")}
		r.start()
		r.await("l", "A")
		for i, step := range []struct{ ts, backend, want string }{
			{"..2026_11_26_02", b, "B"},
			{"..2026_11_26_03", a, "A"},
		} {
			mk(step.ts, step.backend)
			tmp := filepath.Join(dir, "..data_tmp")
			os.Symlink(step.ts, tmp)
			if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
				t.Fatal(err)
			}
			old := []string{"..2026_11_26_01", "..2026_11_26_02"}[i]
			os.RemoveAll(filepath.Join(dir, old))
			r.await("l", step.want)
		}
	})
	t.Run("symlink to a file elsewhere", func(t *testing.T) {
		real := filepath.Join(t.TempDir(), "real.toml")
		os.WriteFile(real, []byte(appConfig(a)), 0o644)
		dir := t.TempDir()
		link := filepath.Join(dir, "portcullis.toml")
		os.Symlink(real, link)
		r := &rig{t: t, dir: dir, path: link}
		r.start()
		r.await("l", "A")
		os.WriteFile(real, []byte(appConfig(b)), 0o644)
		r.await("l", "B")
	})
	t.Run("explicit reload", func(t *testing.T) {
		r := newRig(t, appConfig(a))
		if err := r.m.Reload("sighup"); err != nil {
			t.Fatal(err)
		}
		if st := r.m.Status(); st.LastTrigger != "sighup" || st.LastResult != "success" {
			t.Fatalf("status %+v", st)
		}
	})
}

func TestDebounceOneReloadPerSave(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	r := newRig(t, appConfig(a))
	before := r.count("success")
	// One save that arrives as several writes, as some editors do.
	f, _ := os.OpenFile(r.path, os.O_WRONLY|os.O_TRUNC, 0)
	text := appConfig(b)
	for i := 0; i < len(text); i += len(text)/5 + 1 {
		f.WriteString(text[i:min(i+len(text)/5+1, len(text))])
		f.Sync()
	}
	f.Close()
	r.await("l", "B")
	time.Sleep(300 * time.Millisecond) // several debounce periods: nothing more may come
	if got := r.count("success") - before; got != 1 {
		t.Fatalf("%v reloads for one save, want 1", got)
	}
	// Saving the same content again is recognised as a no-op.
	r.write(appConfig(b))
	testnet.WaitFor(t, "unchanged result", func() bool { return r.count("unchanged") >= 1 })
	if got := r.count("success") - before; got != 1 {
		t.Fatalf("an identical save recompiled (%v successes)", got)
	}
}

func TestBrokenFileKeepsServing(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	r := newRig(t, appConfig(a))
	r.await("l", "A")
	for _, broken := range []string{
		appConfig(b) + "\nbogus_key = 1\n",
		strings.Replace(appConfig(b), `backend =`, `backend = 7 #`, 1),
		appConfig(b) + "\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n",
		"[[listener]\n",
	} {
		fails := r.count("failure")
		r.write(broken)
		testnet.WaitFor(t, "failure counted", func() bool { return r.count("failure") == fails+1 })
		if got := r.ask("l"); got != "A" {
			t.Fatalf("after a broken save, routed to %q", got)
		}
		st := r.m.Status()
		if st.LastResult != "failure" || !strings.Contains(st.LastError, r.path+":") {
			t.Fatalf("status does not name file:line: %+v", st)
		}
		if testutil.ToFloat64(r.m.metrics.lastOK) != 0 {
			t.Fatal("last-reload gauge still says success")
		}
	}
	r.write(appConfig(b))
	r.await("l", "B")
	if testutil.ToFloat64(r.m.metrics.lastOK) != 1 {
		t.Fatal("last-reload gauge not back to 1")
	}
}

// TestBrokenFileRevertedIsLogged: a broken save logs an error; saving the
// serving content back is an "unchanged" reload, which must also be
// logged at info level. Otherwise the last line an operator (or a log
// alert) sees about the config stays "reload failed" although the file
// is good again.
func TestBrokenFileRevertedIsLogged(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	var logs syncBuffer
	r := &rig{t: t, dir: t.TempDir(), log: slog.New(slog.NewTextHandler(&logs, nil))}
	r.path = filepath.Join(r.dir, "portcullis.toml")
	r.write(appConfig(a))
	r.start()
	r.await("l", "A")

	r.write(appConfig(a) + "\nbogus_key = 1\n")
	testnet.WaitFor(t, "failure counted", func() bool { return r.count("failure") == 1 })
	r.write(appConfig(a))
	testnet.WaitFor(t, "unchanged counted", func() bool { return r.count("unchanged") == 1 })
	out := logs.String()
	failed := strings.LastIndex(out, "reload failed")
	if failed < 0 || !strings.Contains(out[failed:], "\ntime=") || !strings.Contains(out[failed:], "level=INFO") {
		t.Fatalf("no info line after the broken save was reverted:\n%s", out)
	}
}

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestPortInUseRollsBack(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	r := newRig(t, appConfig(a))
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	free := freePort(t)
	next := appConfig(b) + fmt.Sprintf(`
[[listener]]
name = "extra"
listen = %q

[[listener]]
name = "busy"
listen = %q
`, free, busy.Addr().String())
	r.write(next)
	testnet.WaitFor(t, "failure", func() bool { return r.count("failure") == 1 })
	if !strings.Contains(r.m.Status().LastError, "listener[2].listen") {
		t.Fatalf("error does not name the listener: %s", r.m.Status().LastError)
	}
	if got := r.ask("l"); got != "A" {
		t.Fatalf("route changed despite the failed reload: %q", got)
	}
	// The listener that could be opened was closed again.
	ln, err := net.Listen("tcp", free)
	if err != nil {
		t.Fatalf("the rolled-back listener still holds %s: %v", free, err)
	}
	ln.Close()
	if n := len(r.srv.Status()); n != 1 {
		t.Fatalf("%d listeners after rollback, want 1", n)
	}
}

func TestListenerChanges(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	p1, p2 := freePort(t), freePort(t)
	cfg := func(addrs ...string) string {
		var s strings.Builder
		for i, addr := range addrs {
			fmt.Fprintf(&s, "[[listener]]\nname = \"l%d\"\nlisten = %q\n[[listener.route]]\nsni = \"*\"\nbackend = %q\n", i, addr, a)
		}
		return s.String()
	}
	r := newRig(t, cfg(p1))
	r.await("l0", "A")

	// A live connection on a listener that is about to be removed.
	live, err := net.Dial("tcp", p1)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	live.SetDeadline(time.Now().Add(10 * time.Second))
	live.Write(r.hello)
	if l, _ := testnet.ReadLine(live); l != "A" {
		t.Fatalf("live greeting %q", l)
	}

	// Move the listener to another address.
	r.write(cfg(p2))
	testnet.WaitFor(t, "new address", func() bool { return r.srv.Addr("l0").String() == p2 })
	r.await("l0", "A")
	ln, err := net.Listen("tcp", p1)
	if err != nil {
		t.Fatalf("removed listener's port is still bound: %v", err)
	}
	ln.Close()
	// The live connection outlives its listener.
	io.WriteString(live, "still here")
	buf := make([]byte, 10)
	if _, err := io.ReadFull(live, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("live connection broken by the reload: %q %v", buf, err)
	}

	// Add a second listener, then remove it.
	r.write(cfg(p2, p1))
	testnet.WaitFor(t, "second listener", func() bool { return len(r.srv.Status()) == 2 })
	r.await("l1", "A")
	r.write(cfg(p2))
	testnet.WaitFor(t, "second listener gone", func() bool { return len(r.srv.Status()) == 1 })
}

func TestRouteVisibleRightAfterReload(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	r := newRig(t, appConfig(a))
	for i := 0; i < 10; i++ {
		want, backend := "B", b
		if i%2 == 1 {
			want, backend = "A", a
		}
		n := r.count("success")
		r.write(appConfig(backend))
		testnet.WaitFor(t, "reload", func() bool { return r.count("success") > n })
		// No polling: the very next connection must see the new route.
		if got := r.ask("l"); got != want {
			t.Fatalf("round %d: first connection after the reload went to %q, want %q", i, got, want)
		}
	}
}

// TestReloadsUnderLoad swaps the route back and forth 100 times while 50
// connections stream data through it; none may break or lose a byte,
// and nothing may be left behind.
func TestReloadsUnderLoad(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	r := newRig(t, appConfig(a))
	fdsBefore := countFDs(t)

	const streams = 50
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := 0; i < streams; i++ {
		c, err := net.Dial("tcp", r.srv.Addr("l").String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		c.Write(r.hello)
		if l, _ := testnet.ReadLine(c); l != "A" {
			t.Fatalf("stream %d greeting %q", i, l)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			msg := []byte(fmt.Sprintf("stream-%02d-payload-", i))
			buf := make([]byte, len(msg))
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.Write(msg); err != nil {
					errs <- fmt.Errorf("stream %d write %d: %v", i, n, err)
					return
				}
				if _, err := io.ReadFull(c, buf); err != nil || string(buf) != string(msg) {
					errs <- fmt.Errorf("stream %d read %d: %q %v", i, n, buf, err)
					return
				}
			}
		}()
	}
	for i := 0; i < 100; i++ {
		backend := a
		if i%2 == 0 {
			backend = b
		}
		n := r.count("success")
		r.write(appConfig(backend))
		testnet.WaitFor(t, "reload", func() bool { return r.count("success") > n })
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := len(r.srv.Status()); n != 1 {
		t.Fatalf("%d listeners, want 1", n)
	}
	testnet.WaitFor(t, "connections closed", func() bool { return r.srv.Status()[0].Active == 0 })
	testnet.WaitFor(t, "descriptors released", func() bool { return countFDs(t) <= fdsBefore+8 })
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("needs /proc")
	}
	return len(ents)
}

// TestErrorsPointAtTheFileAfterOverrides: once an override hides or adds
// routes, errors still name the route's place in the file (or say it
// came from an override), not its position in the merged list.
func TestErrorsPointAtTheFileAfterOverrides(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	two := func(secondExtra string) string {
		return appConfig(a) + fmt.Sprintf("\n  [[listener.route]]\n  sni = \"b.test\"\n  backend = %q\n%s", a, secondExtra)
	}
	r := newRig(t, two(""))
	tomb := state.RouteOverride{Listener: "l", SNI: "app.test", Deleted: true}
	if err := r.m.Mutate(context.Background(), func(o *state.Overrides) error { o.SetRoute(tomb); return nil }, nil); err != nil {
		t.Fatal(err)
	}
	bad := state.RouteOverride{Listener: "l", SNI: "x.test", Route: config.Route{SNI: "x.test", Mode: "l7", Backend: a, TLSCert: "/nonexistent.pem", TLSKey: "/nonexistent-key.pem"}}
	err := r.m.Mutate(context.Background(), func(o *state.Overrides) error { o.SetRoute(bad); return nil }, nil)
	if err == nil || !strings.Contains(err.Error(), `listener[0].override(sni="x.test").tls_cert`) {
		t.Fatalf("override error does not name the override: %v", err)
	}
	// The file's second route (route[1]) breaks: with route[0] hidden it is
	// first in the merged list, but the error must name route[1] and its line.
	r.write(two("  mode = \"l7\"\n  tls_cert = \"missing.pem\"\n  tls_key = \"missing-key.pem\"\n"))
	err = r.m.Reload("test")
	want := fmt.Sprintf("%s:14: listener[0].route[1].tls_cert", r.path)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v\ndoes not contain %q", err, want)
	}
}

// TestMutateRefusesOverrideForMissingListener: the admin API checks that
// a listener exists before Mutate takes the manager's lock, so a file
// reload that removes the listener can come in between. Mutate must then
// refuse the change instead of storing an override that is never
// applied (and telling the caller it succeeded). Clearing an override of
// the removed listener, and other changes while it is orphaned, still
// work.
func TestMutateRefusesOverrideForMissingListener(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	two := appConfig(a) + "\n[[listener]]\nname = \"l2\"\nlisten = \"127.0.0.2:0\"\n"
	dir := t.TempDir()
	st, err := state.Open(filepath.Join(dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	r := &rig{t: t, dir: dir, path: filepath.Join(dir, "portcullis.toml"), store: st}
	r.write(two)
	r.start()
	ctx := context.Background()
	put := func(ro state.RouteOverride) error {
		return r.m.Mutate(ctx, func(o *state.Overrides) error { o.SetRoute(ro); return nil },
			func(ctx context.Context, s *state.Store) error { return s.PutRoute(ctx, ro) })
	}
	kept := state.RouteOverride{Listener: "l2", SNI: "kept.test", Route: config.Route{Backend: a}}
	if err := put(kept); err != nil {
		t.Fatal(err)
	}
	before, err := st.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// The file loses l2 after the API found it there.
	r.write(appConfig(a))
	if err := r.m.Reload("test"); err != nil {
		t.Fatal(err)
	}
	lo := state.ListenerOverride{Listener: "l2", MaxConnections: 3}
	for name, call := range map[string]func() error{
		"route": func() error {
			return put(state.RouteOverride{Listener: "l2", SNI: "late.test", Route: config.Route{Backend: a}})
		},
		"tombstone": func() error {
			return put(state.RouteOverride{Listener: "l2", SNI: "kept.test", Deleted: true})
		},
		"max_connections": func() error {
			return r.m.Mutate(ctx, func(o *state.Overrides) error { o.SetListener(lo); return nil },
				func(ctx context.Context, s *state.Store) error { return s.PutListener(ctx, lo) })
		},
	} {
		if err := call(); !errors.Is(err, ErrNoListener) {
			t.Errorf("%s override on the removed listener: %v, want ErrNoListener", name, err)
		}
	}
	after, err := st.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(after, before) {
		t.Errorf("database changed by refused mutations:\n%+v\nwas\n%+v", after, before)
	}
	if got := r.m.Overrides(); len(got.Routes) != 1 || len(got.Listeners) != 0 {
		t.Errorf("memory changed by refused mutations: %+v", got)
	}

	// Other changes, and clearing the orphan, are allowed.
	if err := put(state.RouteOverride{Listener: "l", SNI: "other.test", Route: config.Route{Backend: a}}); err != nil {
		t.Errorf("route override on l while l2's is orphaned: %v", err)
	}
	err = r.m.Mutate(ctx, func(o *state.Overrides) error { o.RemoveRoute("l2", "kept.test"); return nil },
		func(ctx context.Context, s *state.Store) error { return s.ClearRoute(ctx, "l2", "kept.test") })
	if err != nil {
		t.Errorf("clearing the orphan: %v", err)
	}
}

// TestSpecialFileFailsReload: a saved config whose L7 certificate is a
// FIFO without a writer blocked the reload in the open for ever, holding
// the manager's lock, so later reloads, SIGHUPs and admin calls hung
// with it. The reload now fails at once like any other bad certificate:
// the old snapshot keeps serving, the error names file:line:key and the
// path, and the next good save is applied.
func TestSpecialFileFailsReload(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	b := testnet.NamedBackend(t, "B")
	r := newRig(t, appConfig(a))
	fifo := filepath.Join(r.dir, "certs", "app.pem")
	if err := os.Mkdir(filepath.Dir(fifo), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Registered after the rig's, so it runs first: a reload still
	// blocked in the open gets a writer (and then EOF) and ends, and the
	// rig can stop.
	t.Cleanup(func() {
		if w, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			w.Close()
		}
	})
	r.await("l", "A")
	fails := r.count("failure")
	r.write(strings.Replace(appConfig(b), "  backend =", "  mode = \"l7\"\n  tls_cert = \"certs/app.pem\"\n  tls_key = \"certs/app-key.pem\"\n  backend =", 1))
	deadline := time.Now().Add(10 * time.Second)
	for r.count("failure") != fails+1 {
		if time.Now().After(deadline) {
			t.Fatal("the reload of a config naming a FIFO as tls_cert neither failed nor succeeded in 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := r.ask("l"); got != "A" {
		t.Fatalf("after a failed reload, routed to %q, want the old snapshot's A", got)
	}
	want := fmt.Sprintf("%s:9: listener[0].route[0].tls_cert: %s: not a regular file (named pipe)", r.path, fifo)
	if st := r.m.Status(); st.LastResult != "failure" || !strings.Contains(st.LastError, want) {
		t.Fatalf("status %+v, want a failure with %q", st, want)
	}
	r.write(appConfig(b))
	r.await("l", "B")
}

// TestStartOnlySectionsWarn: a reload whose [admin], [metrics] or
// [state] differ from what the daemon started with applies the rest of
// the file and says that those sections wait for a restart, at every
// such reload; once they are back to the start's, it says nothing.
func TestStartOnlySectionsWarn(t *testing.T) {
	a, b := testnet.NamedBackend(t, "A"), testnet.NamedBackend(t, "B")
	metrics := func(port int) string { return fmt.Sprintf("[metrics]\nlisten = \"127.0.0.1:%d\"\n", port) }
	var logs syncBuffer
	r := &rig{t: t, dir: t.TempDir(), log: slog.New(slog.NewTextHandler(&logs, nil))}
	r.path = filepath.Join(r.dir, "portcullis.toml")
	r.write(metrics(9101) + appConfig(a))
	r.start()
	r.await("l", "A")

	r.write(metrics(9102) + appConfig(b))
	r.await("l", "B")
	out := logs.String()
	if !strings.Contains(out, "takes effect at the next restart") || !strings.Contains(out, "section=metrics") {
		t.Fatalf("no warning that [metrics] waits for a restart:\n%s", out)
	}
	for _, s := range []string{"section=admin", "section=state"} {
		if strings.Contains(out, s) {
			t.Errorf("warned of an unchanged section (%s):\n%s", s, out)
		}
	}

	r.write(metrics(9102) + appConfig(a))
	r.await("l", "A")
	if n := strings.Count(logs.String(), "takes effect at the next restart"); n != 2 {
		t.Fatalf("%d warnings after a second reload still off the start's [metrics], want 2:\n%s", n, logs.String())
	}
	r.write(metrics(9101) + appConfig(b))
	r.await("l", "B")
	if n := strings.Count(logs.String(), "takes effect at the next restart"); n != 2 {
		t.Fatalf("%d warnings after [metrics] went back to the start's, want still 2:\n%s", n, logs.String())
	}
}

// TestStartLeavesOutOverrideThatCannotApply: a stored L7 route override
// whose certificate is gone (deleted while the daemon was down) does not
// stop the start, which would keep down the admin API that can clear it.
// The rest serves, the override is reported among the orphans and stays
// stored, a mutation names it until it is dealt with, and clearing it
// works.
func TestStartLeavesOutOverrideThatCannotApply(t *testing.T) {
	a := testnet.NamedBackend(t, "A")
	dir := t.TempDir()
	st, err := state.Open(filepath.Join(dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	gone := state.RouteOverride{Listener: "l", SNI: "x.test", Route: config.Route{
		SNI: "x.test", Mode: config.ModeL7, Backend: a,
		TLSCert: filepath.Join(dir, "deleted.pem"), TLSKey: filepath.Join(dir, "deleted-key.pem"),
	}}
	if err := st.PutRoute(ctx, gone); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	r := &rig{t: t, dir: dir, path: filepath.Join(dir, "portcullis.toml"), store: st, log: slog.New(slog.NewTextHandler(&logs, nil))}
	r.write(appConfig(a))
	r.start() // fails the test if Start does

	r.await("l", "A")
	if !strings.Contains(logs.String(), "stored route override cannot be applied") || !strings.Contains(logs.String(), "sni=x.test") {
		t.Errorf("no error line naming the override:\n%s", logs.String())
	}
	orphans := r.m.Effective().Orphans
	if len(orphans) != 1 || orphans[0].SNI != "x.test" || !strings.Contains(orphans[0].Reason, "tls_cert") {
		t.Fatalf("orphans = %+v, want the x.test override with its reason", orphans)
	}
	if o, err := st.Load(ctx); err != nil || len(o.Routes) != 1 {
		t.Fatalf("stored overrides: %+v, %v; want the override kept", o, err)
	}

	block := state.FirewallOverride{Value: "192.0.2.1/32"}
	err = r.m.Mutate(ctx, func(o *state.Overrides) error { o.SetFirewall(block); return nil },
		func(ctx context.Context, s *state.Store) error { return s.PutFirewall(ctx, block) })
	if err == nil || !strings.Contains(err.Error(), `override(sni="x.test")`) {
		t.Fatalf("a mutation with the broken override stored: %v; want an error naming it", err)
	}
	err = r.m.Mutate(ctx, func(o *state.Overrides) error { o.RemoveRoute("l", "x.test"); return nil },
		func(ctx context.Context, s *state.Store) error { return s.ClearRoute(ctx, "l", "x.test") })
	if err != nil {
		t.Fatalf("clearing the override: %v", err)
	}
	if n := len(r.m.Effective().Orphans); n != 0 {
		t.Fatalf("%d orphans after clearing", n)
	}
}
