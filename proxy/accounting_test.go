package proxy

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/testnet"
)

// logSink collects JSON log lines.
type logSink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

// lines returns every line logged so far.
func (s *logSink) lines() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(s.buf.String(), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// waitLine waits for a line whose key has value and returns it.
func (s *logSink) waitLine(t *testing.T, key, value string) map[string]any {
	t.Helper()
	var line map[string]any
	testnet.WaitFor(t, "a line with "+key+"="+value, func() bool {
		for _, l := range s.lines() {
			if l[key] == value {
				line = l
				return true
			}
		}
		return false
	})
	return line
}

// accessLines returns the "connection" lines logged so far.
func (s *logSink) accessLines() []map[string]any {
	var out []map[string]any
	for _, m := range s.lines() {
		if m["msg"] == "connection" {
			out = append(out, m)
		}
	}
	return out
}

// startLoggedProxy is startProxy with the access log captured.
// wantEnds fails t unless every access line logged so far ended as want.
func (s *logSink) wantEnds(t *testing.T, want string) {
	t.Helper()
	lines := s.accessLines()
	var wrong []string
	for _, l := range lines {
		if end, _ := l["end"].(string); end != want {
			wrong = append(wrong, end)
		}
	}
	if len(wrong) > 0 {
		t.Fatalf("%d of %d connections logged with the wrong end reason (want %s): %q", len(wrong), len(lines), want, wrong)
	}
}

func startLoggedProxy(t *testing.T, toml string) (*harness, *logSink) {
	t.Helper()
	sink := &logSink{}
	h := &harness{t: t, reg: prometheus.NewRegistry(), dir: t.TempDir()}
	h.srv = NewServer(Options{Registerer: h.reg, Logger: slog.New(slog.NewJSONHandler(sink, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	h.apply(toml)
	t.Cleanup(func() { h.srv.Shutdown(canceledCtx()) })
	return h, sink
}

// TestEndReasonClientAbortsDownload: a client that resets a download in
// progress (closes with unread data) is logged as client_reset. The
// backend never reset anything.
func TestEndReasonClientAbortsDownload(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "dl.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	h, sink := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("dl.test", backend))
	const rounds = 10
	for i := 0; i < rounds; i++ {
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(time.Minute))
		c.Write(hello)
		if _, err := io.ReadFull(c, make([]byte, 1<<20)); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close() // RST: the client aborts the download
		testnet.WaitFor(t, "access log line", func() bool { return len(sink.accessLines()) == i+1 })
	}
	sink.wantEnds(t, "client_reset")
}

// TestEndReasonBackendAbortsUpload: the mirror image — a backend that
// resets while the client uploads is logged as backend_reset.
func TestEndReasonBackendAbortsUpload(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "ul.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)+1<<20))
		c.SetLinger(0) // RST: the backend aborts the upload
	})
	h, sink := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("ul.test", backend))
	const rounds = 10
	for i := 0; i < rounds; i++ {
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(time.Minute))
		c.Write(hello)
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				break
			}
		}
		c.Close()
		testnet.WaitFor(t, "access log line", func() bool { return len(sink.accessLines()) == i+1 })
	}
	sink.wantEnds(t, "backend_reset")
}

// TestFailedApplyLeavesNoSeries: a reload that fails (here: the new
// listener's port is taken) publishes nothing, so it must not leave
// series for the listener and routes it never served — not even after
// the operator takes the listener out again.
func TestFailedApplyLeavesNoSeries(t *testing.T) {
	backend := rawBackend(t, func(c *net.TCPConn) {})
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	base := "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n" + routeTOML("keep.test", backend)
	h := startProxy(t, base)
	bad := base + "[[listener]]\nname = \"typo\"\nlisten = \"" + taken.Addr().String() + "\"\n" + routeTOML("never.test", backend)
	snap := compileTOML(t, h.srv, h.dir, bad)
	if err := h.srv.Apply(snap); err == nil {
		t.Fatal("Apply succeeded on a port in use")
	}
	h.srv.Discard(snap)
	h.apply(base) // the operator gives up on the new listener
	if leaked := h.seriesLabelled("typo", "never.test"); len(leaked) > 0 {
		t.Fatalf("%d series of a listener that never served are exported:\n%s", len(leaked), strings.Join(leaked, "\n"))
	}
}

// TestFailedCompileLeavesNoSeries: the same for a reload refused while
// compiling (an L7 route whose certificate does not load).
func TestFailedCompileLeavesNoSeries(t *testing.T) {
	backend := rawBackend(t, func(c *net.TCPConn) {})
	base := "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n" + routeTOML("keep.test", backend)
	h := startProxy(t, base)
	bad := base + "[[listener]]\nname = \"typo\"\nlisten = \"127.0.0.2:0\"\n" + routeTOML("never.test", backend) +
		routeTOML("l7.test", backend, `  mode = "l7"`, `  tls_cert = "missing.pem"`, `  tls_key = "missing-key.pem"`)
	if err := os.WriteFile(filepath.Join(h.dir, "portcullis.toml"), []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(filepath.Join(h.dir, "portcullis.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.srv.Compile(cfg); err == nil {
		t.Fatal("compiled an L7 route without its certificate")
	} else {
		t.Log(err)
	}
	if leaked := h.seriesLabelled("typo", "never.test", "l7.test"); len(leaked) > 0 {
		t.Fatalf("%d series of a compile that failed are exported:\n%s", len(leaked), strings.Join(leaked, "\n"))
	}
}

// seriesLabelled lists the exported series that carry any of values as
// a label value.
func (h *harness) seriesLabelled(values ...string) []string {
	h.t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	var found []string
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if slices.Contains(values, lp.GetValue()) {
					found = append(found, mf.GetName()+" "+lp.GetName()+"="+lp.GetValue())
					break
				}
			}
		}
	}
	return found
}

// TestNoRouteLogNamesSNI: the no_route rejection's log line says which
// SNI matched nothing, which is what the operator needs to add a route.
func TestNoRouteLogNamesSNI(t *testing.T) {
	h, sink := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("a.test", "127.0.0.1:1"))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(clientHelloBytes(t, &tls.Config{ServerName: "missing.test"}))
	line := sink.waitLine(t, "reason", "no_route")
	if e, _ := line["err"].(string); !strings.Contains(e, `"missing.test"`) {
		t.Fatalf("no_route line %v does not name the SNI", line)
	}
}

// TestReloadAnnouncesListeners: a listener a reload adds or removes is
// logged, with its name and address, as the ones opened at start are.
func TestReloadAnnouncesListeners(t *testing.T) {
	a := "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n" + routeTOML("a.test", "127.0.0.1:1")
	b := "[[listener]]\nname = \"b\"\nlisten = \"127.0.0.2:0\"\n" + routeTOML("b.test", "127.0.0.1:1")
	h, sink := startLoggedProxy(t, a)
	count := func(msg, listener string) int {
		n := 0
		for _, l := range sink.lines() {
			if l["msg"] == msg && l["listener"] == listener && l["addr"] != "" {
				n++
			}
		}
		return n
	}
	h.apply(a + b)
	if count("listening", "b") != 1 || count("listening", "a") != 0 {
		t.Fatalf("after adding b: want one \"listening\" line for b and none for a (announced by the caller at start):\n%v", sink.lines())
	}
	h.apply(a)
	if count("listener closed", "b") != 1 || count("listener closed", "a") != 0 {
		t.Fatalf("after removing b: want one \"listener closed\" line for b:\n%v", sink.lines())
	}
}

// TestMaxConnectionsLogNamesClient: the rejection line at the cap names
// the client (the peer, on a listener without PROXY protocol).
func TestMaxConnectionsLogNamesClient(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "cap.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.Copy(io.Discard, c)
	})
	h, sink := startLoggedProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 1\n"+routeTOML("cap.test", backend))
	first, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	first.Write(hello)
	testnet.WaitFor(t, "the first connection", func() bool { return h.srv.Status()[0].Active == 1 })
	// From an address of its own: the reset at the cap can beat the
	// connect's own completion, and then Dial has no local address to
	// tell.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 3)}}
	if second, err := d.Dial("tcp", h.addr("l")); err == nil {
		defer second.Close()
	}
	line := sink.waitLine(t, "reason", "max_connections")
	if c, _ := line["client"].(string); !strings.HasPrefix(c, "127.0.0.3:") {
		t.Fatalf("max_connections line %v: client want 127.0.0.3:port", line)
	}
}
