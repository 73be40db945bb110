package proxy

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
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// harness runs a Server on a config written to a temp file.
type harness struct {
	t   *testing.T
	srv *Server
	reg *prometheus.Registry
	dir string
}

// startProxy compiles and applies a config whose text is toml. Listener
// addresses should be 127.0.0.1:0.
func startProxy(t *testing.T, toml string) *harness {
	t.Helper()
	h := &harness{t: t, reg: prometheus.NewRegistry(), dir: t.TempDir()}
	var log *slog.Logger
	if os.Getenv("PORTCULLIS_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	h.srv = NewServer(Options{Registerer: h.reg, Logger: log})
	h.apply(toml)
	t.Cleanup(func() { h.srv.Shutdown(canceledCtx()) })
	return h
}

func (h *harness) apply(toml string) {
	h.t.Helper()
	if err := h.srv.Apply(compileTOML(h.t, h.srv, h.dir, toml)); err != nil {
		h.t.Fatal(err)
	}
}

// compileTOML writes toml to dir/portcullis.toml and compiles it.
func compileTOML(t testing.TB, srv *Server, dir, toml string) *Snapshot {
	t.Helper()
	path := filepath.Join(dir, "portcullis.toml")
	if err := os.WriteFile(path, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := srv.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

func (h *harness) addr(listener string) string {
	a := h.srv.Addr(listener)
	if !a.IsValid() {
		h.t.Fatalf("no listener %q", listener)
	}
	return a.String()
}

// rejected reads the rejection counter for a listener and reason.
func (h *harness) rejected(listener, why string) float64 {
	return testutil.ToFloat64(h.srv.metrics.rejected.WithLabelValues(listener, why))
}

// tlsBackend is a TLS server that greets every client with its name
// and then echoes.
type tlsBackend struct {
	ln   net.Listener
	name string
	wg   sync.WaitGroup
}

func newTLSBackend(t *testing.T, ca *testpki.CA, name string, hosts ...string) *tlsBackend {
	t.Helper()
	leaf := ca.Leaf(t, hosts...)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{leaf.Cert}})
	if err != nil {
		t.Fatal(err)
	}
	b := &tlsBackend{ln: ln, name: name}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				io.WriteString(c, b.name+"\n")
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); b.wg.Wait() })
	return b
}

func (b *tlsBackend) addr() string { return b.ln.Addr().String() }

// echoBackend reads the ClientHello the proxy replays and then echoes
// everything back.
func echoBackend(t *testing.T, hello []byte) string {
	return rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(c, c)
	})
}

// dialEcho connects to addr, sends hello and then tag, and waits for
// the tag to come back: a relay that is up and has carried a message
// each way. The connection is returned open.
func dialEcho(addr string, hello []byte, tag string) (net.Conn, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(time.Minute))
	c.Write(append(append([]byte{}, hello...), tag...))
	buf := make([]byte, len(tag))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != tag {
		return c, fmt.Errorf("%s: echo %q %v", tag, buf, err)
	}
	return c, nil
}

// rawBackend accepts plain TCP and hands each connection to serve.
func rawBackend(t *testing.T, serve func(c *net.TCPConn)) string { return testnet.Backend(t, serve) }

// dialTLS connects through the proxy with SNI name and returns the
// backend's greeting line.
func dialTLS(t *testing.T, addr, name string, ca *testpki.CA) (*tls.Conn, string) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: name, RootCAs: ca.Pool()})
	if err != nil {
		t.Fatalf("dial %s via %s: %v", name, addr, err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := readLine(c)
	if err != nil {
		t.Fatalf("read greeting for %s: %v", name, err)
	}
	return c, line
}

func readLine(r io.Reader) (string, error) { return testnet.ReadLine(r) }

// clientHelloBytes returns the records a real crypto/tls client sends
// first, for the given config.
func clientHelloBytes(t testing.TB, cfg *tls.Config) []byte { return testnet.ClientHello(t, cfg) }

// splitRecord re-frames a single-record ClientHello as two records.
func splitRecord(rec []byte, at int) []byte {
	body := rec[5:]
	mk := func(p []byte) []byte {
		return append([]byte{0x16, rec[1], rec[2], byte(len(p) >> 8), byte(len(p))}, p...)
	}
	return append(mk(body[:at]), mk(body[at:])...)
}

func routeTOML(sni, backend string, extra ...string) string {
	return fmt.Sprintf("\n  [[listener.route]]\n  sni = %q\n  backend = %q\n%s", sni, backend, strings.Join(extra, "\n"))
}

func canceledCtx() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func (h *harness) routeBytes(listener, route, dir string) float64 {
	return testutil.ToFloat64(h.srv.metrics.routeBytes.WithLabelValues(listener, route, dir))
}

// shutdownCutting shuts the server down with grace and requires it to
// cut what (a connection still live) and return soon after the grace
// ends: Shutdown returns only once every connection has ended.
func (h *harness) shutdownCutting(grace time.Duration, what string) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- h.srv.Shutdown(ctx) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			h.t.Fatalf("Shutdown = %v, want DeadlineExceeded", err)
		}
	case <-time.After(10 * time.Second):
		h.t.Fatalf("Shutdown still waiting 10s after its grace period ended: %s was not cut", what)
	}
}
