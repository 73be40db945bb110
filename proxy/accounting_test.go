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

// accessLines returns the "connection" lines logged so far.
func (s *logSink) accessLines() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(s.buf.String(), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "connection" {
			out = append(out, m)
		}
	}
	return out
}

// startLoggedProxy is startProxy with the access log captured.
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
	var wrong []string
	for _, l := range sink.accessLines() {
		if l["end"] != "client_reset" {
			wrong = append(wrong, l["end"].(string))
		}
	}
	if len(wrong) > 0 {
		t.Fatalf("%d of %d client aborts logged with the wrong end reason: %q", len(wrong), rounds, wrong)
	}
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
	var wrong []string
	for _, l := range sink.accessLines() {
		if l["end"] != "backend_reset" {
			wrong = append(wrong, l["end"].(string))
		}
	}
	if len(wrong) > 0 {
		t.Fatalf("%d of %d backend aborts logged with the wrong end reason: %q", len(wrong), rounds, wrong)
	}
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
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var leaked []string
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetValue() == "typo" || lp.GetValue() == "never.test" {
					leaked = append(leaked, mf.GetName()+" "+m.String())
					break
				}
			}
		}
	}
	if len(leaked) > 0 {
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
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var leaked []string
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v := lp.GetValue(); v == "typo" || v == "never.test" || v == "l7.test" {
					leaked = append(leaked, mf.GetName()+" "+lp.GetName()+"="+v)
					break
				}
			}
		}
	}
	if len(leaked) > 0 {
		t.Fatalf("%d series of a compile that failed are exported:\n%s", len(leaked), strings.Join(leaked, "\n"))
	}
}
