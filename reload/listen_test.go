package reload

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/testnet"
)

// startManager runs a Manager on the config cfg in a temp dir, with no
// file watcher: reloads happen only when the test asks.
func startManager(t *testing.T, cfg string) (path string, srv *proxy.Server, m *Manager) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "portcullis.toml")
	writeTo(t, path, cfg)
	srv = proxy.NewServer(proxy.Options{})
	m = New(Options{Path: path, Server: srv})
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return path, srv, m
}

// TestWildcardListenRespelled: ":P", "0.0.0.0:P" and "[::]:P" are
// one socket (config validation treats them as duplicates), so a reload
// that only re-spells the listen address must keep the socket, not try
// to bind a second one next to it.
func TestWildcardListenRespelled(t *testing.T) {
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	a := testnet.NamedBackend(t, "A")
	cfg := func(listen string) string {
		return fmt.Sprintf("[[listener]]\nname = \"l\"\nlisten = %q\n[[listener.route]]\nsni = \"*\"\nbackend = %q\n", listen, a)
	}
	path, srv, m := startManager(t, cfg(fmt.Sprintf(":%d", port)))
	hello := testnet.ClientHello(t, &tls.Config{ServerName: "app.test"})
	for _, listen := range []string{fmt.Sprintf("0.0.0.0:%d", port), fmt.Sprintf("[::]:%d", port), fmt.Sprintf("[::ffff:0.0.0.0]:%d", port), fmt.Sprintf(":%d", port)} {
		writeTo(t, path, cfg(listen))
		if err := m.Reload("test"); err != nil {
			t.Fatalf("re-spelling the listen address as %q: %v", listen, err)
		}
		if got, err := testnet.Ask(fmt.Sprintf("127.0.0.1:%d", port), hello); got != "A" {
			t.Fatalf("after %q: routed to %q, %v", listen, got, err)
		}
		if n := len(srv.Status()); n != 1 {
			t.Fatalf("after %q: %d listeners, want 1", listen, n)
		}
	}
}
