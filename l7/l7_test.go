package l7

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

const url = "https://" + frontName

// TestNewHandlerWarnsOfUnusableCertificate: a certificate that loads
// but that clients will refuse (expired, not valid yet, or not naming
// the route's hosts) is accepted with a warning saying why.
func TestNewHandlerWarnsOfUnusableCertificate(t *testing.T) {
	pki := newTestPKI(t)
	now := time.Now()
	day := 24 * time.Hour
	tests := []struct {
		name, sni string
		leaf      testpki.Leaf
		want      string // "" for no warning
	}{
		{"valid", "app.test", pki.Leaf(t, "app.test"), ""},
		{"expired", "app.test", pki.LeafValid(t, now.Add(-2*day), now.Add(-day), "app.test"), "tls_cert has expired"},
		{"not valid yet", "app.test", pki.LeafValid(t, now.Add(day), now.Add(2*day), "app.test"), "tls_cert is not valid yet"},
		{"other name", "app.test", pki.Leaf(t, "other.test"), "tls_cert does not name the route's sni"},
		{"wildcard certificate", "app.test", pki.Leaf(t, "*.test"), ""},
		{"wildcard route and certificate", "*.w.test", pki.Leaf(t, "*.w.test"), ""},
		{"wildcard route, one name", "*.w.test", pki.Leaf(t, "a.w.test"), "tls_cert does not name the route's sni"},
		{"default route", "*", pki.Leaf(t, "app.test"), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs bytes.Buffer
			h, err := NewHandler(Options{
				Listener: "l", Route: tt.sni, CertFile: tt.leaf.CertFile, KeyFile: tt.leaf.KeyFile,
				Backend: "127.0.0.1:1", Logger: slog.New(slog.NewTextHandler(&logs, nil)),
			})
			if err != nil {
				t.Fatalf("NewHandler: %v", err)
			}
			h.Close()
			out := logs.String()
			switch {
			case tt.want == "" && strings.Contains(out, "level=WARN"):
				t.Fatalf("warned of a usable certificate:\n%s", out)
			case tt.want != "" && !strings.Contains(out, tt.want):
				t.Fatalf("no %q warning:\n%s", tt.want, out)
			}
		})
	}
}

func TestNewHandlerErrors(t *testing.T) {
	pki := newTestPKI(t)
	cert, key := pki.leaf(t, frontName)
	notPEM := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	ok := Options{CertFile: cert, KeyFile: key, Backend: "127.0.0.1:1"}
	tests := []struct {
		name string
		edit func(*Options)
		want string
	}{
		{"no cert", func(o *Options) { o.CertFile = "/nonexistent/x.pem" }, "l7: tls_cert: open /nonexistent/x.pem: no such file"},
		{"no key", func(o *Options) { o.KeyFile = "/nonexistent/k.pem" }, "l7: tls_key: open /nonexistent/k.pem"},
		{"key for other cert", func(o *Options) { _, o.KeyFile = pki.leaf(t, "other.test") }, "l7: tls_cert/tls_key: "},
		// crypto/tls says only "failed to parse private key", under the
		// pair's name, for a key an operator forgot to decrypt.
		{"encrypted key (legacy PEM)", func(o *Options) { o.KeyFile = encryptKeyFile(t, key, false) }, "l7: tls_key: " + filepath.Dir(key)},
		{"encrypted key (PKCS #8)", func(o *Options) { o.KeyFile = encryptKeyFile(t, key, true) }, "l7: tls_key: " + filepath.Dir(key)},
		{"backend without port", func(o *Options) { o.Backend = "10.0.0.1" }, "l7: backend: "},
		{"unknown protocol", func(o *Options) { o.Protocol = "h3" }, `l7: backend_protocol: unknown "h3"`},
		{"no CA file", func(o *Options) { o.Protocol, o.BackendCAFile = "h2", "/nonexistent/ca.pem" }, "l7: backend_ca: open /nonexistent/ca.pem"},
		{"CA file without PEM", func(o *Options) { o.Protocol, o.BackendCAFile = "https1", notPEM }, "l7: backend_ca: no PEM certificates"},
		{"CA for plain backend", func(o *Options) { o.BackendCAFile = pki.caFile }, "l7: backend_ca/backend_server_name: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.edit(&o)
			_, err := NewHandler(o)
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Fatalf("err = %v, want prefix %q", err, tt.want)
			}
		})
	}
	h, err := NewHandler(ok)
	if err != nil {
		t.Fatalf("valid options: %v", err)
	}
	h.Close()
}

// encryptKeyFile writes keyFile's key encrypted with a passphrase next to
// it, as a legacy PEM block with an ENCRYPTED Proc-Type header (openssl's
// -aes256) or under PKCS #8's "ENCRYPTED PRIVATE KEY" type, and returns
// the new file's name.
func encryptKeyFile(t *testing.T, keyFile string, pkcs8 bool) string {
	t.Helper()
	data, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	// Deprecated as a way to protect keys, but openssl still writes them so.
	enc, err := x509.EncryptPEMBlock(rand.Reader, b.Type, b.Bytes, []byte("secret"), x509.PEMCipherAES256)
	if err != nil {
		t.Fatal(err)
	}
	name := "legacy-encrypted-key.pem"
	if pkcs8 {
		// The standard library writes no PKCS #8 encryption; the type
		// is what marks it, and the DER is no more readable than the
		// real thing without its passphrase.
		enc = &pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: enc.Bytes}
		name = "pkcs8-encrypted-key.pem"
	}
	out := filepath.Join(filepath.Dir(keyFile), name)
	if err := os.WriteFile(out, pem.EncodeToMemory(enc), 0o600); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestNewHandlerRefusesSpecialFiles: the admin API and the config name
// these files, and opening a FIFO that has no writer blocked for ever —
// under the reload manager's lock, so every later reload and admin call
// hung with it. A FIFO, a device, a directory or a socket is refused at
// once, naming the key and the path; a symlink to a regular file (how
// Kubernetes mounts secrets) still loads.
func TestNewHandlerRefusesSpecialFiles(t *testing.T) {
	pki := newTestPKI(t)
	cert, key := pki.leaf(t, frontName)
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.pem")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock.pem")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ok := Options{CertFile: cert, KeyFile: key, Backend: "127.0.0.1:1"}
	tests := []struct {
		name string
		edit func(*Options)
		want string
	}{
		{"cert FIFO", func(o *Options) { o.CertFile = fifo }, "l7: tls_cert: " + fifo + ": not a regular file (named pipe)"},
		{"key FIFO", func(o *Options) { o.KeyFile = fifo }, "l7: tls_key: " + fifo + ": not a regular file (named pipe)"},
		{"CA FIFO", func(o *Options) { o.Protocol, o.BackendCAFile = "h2", fifo }, "l7: backend_ca: " + fifo + ": not a regular file (named pipe)"},
		{"cert directory", func(o *Options) { o.CertFile = dir }, "l7: tls_cert: " + dir + ": not a regular file (directory)"},
		{"key device", func(o *Options) { o.KeyFile = "/dev/null" }, "l7: tls_key: /dev/null: not a regular file (device)"},
		{"CA socket", func(o *Options) { o.Protocol, o.BackendCAFile = "https1", sock }, "l7: backend_ca: " + sock + ": not a regular file (socket)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.edit(&o)
			done := make(chan error, 1)
			go func() {
				h, err := NewHandler(o)
				if err == nil {
					h.Close()
				}
				done <- err
			}()
			var err error
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				// Unblock the open so the goroutine ends with the test.
				if w, werr := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); werr == nil {
					w.Close()
				}
				t.Fatalf("NewHandler still blocked on %s after 10s", tt.name)
			}
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Fatalf("err = %v, want prefix %q", err, tt.want)
			}
		})
	}

	// Symlinks to regular files, as in a Kubernetes secret volume:
	// tls.crt -> ..data/tls.crt, ..data -> ..2026_11_26_13_00_00.1.
	ts := filepath.Join(dir, "..2026_11_26_13_00_00.1")
	if err := os.Mkdir(ts, 0o700); err != nil {
		t.Fatal(err)
	}
	for src, name := range map[string]string{cert: "tls.crt", key: "tls.key", pki.caFile: "ca.crt"} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ts, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Base(ts), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	h, err := NewHandler(Options{
		CertFile: filepath.Join(dir, "tls.crt"), KeyFile: filepath.Join(dir, "tls.key"),
		Backend: "127.0.0.1:1", Protocol: "h2", BackendCAFile: filepath.Join(dir, "ca.crt"),
	})
	if err != nil {
		t.Fatalf("symlinked files: %v", err)
	}
	h.Close()
}

func TestForwardingHeaders(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, echo)
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})

	spoof := func(req *http.Request) {
		req.Header.Set("X-Forwarded-For", "203.0.113.9")
		req.Header.Set("X-Real-IP", "203.0.113.9")
		req.Header.Set("Forwarded", "for=203.0.113.9")
		req.Header.Set("X-Forwarded-Host", "evil.test")
		req.Header.Set("X-Forwarded-Proto", "http")
	}
	tests := []struct {
		name      string
		trust     bool
		spoof     bool
		xff, real string
		forwarded string
	}{
		{"untrusted", false, false, "127.0.0.1", "127.0.0.1", ""},
		{"untrusted spoofed", false, true, "127.0.0.1", "127.0.0.1", ""},
		{"trusted", true, false, "127.0.0.1", "127.0.0.1", ""},
		{"trusted chain", true, true, "203.0.113.9, 127.0.0.1", "203.0.113.9", "for=203.0.113.9"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := startProxy(t, h, tt.trust).addr
			c, _ := newClient(t, pki, addr, true, "")
			req := mustRequest(t, "GET", url+"/path?q=1", nil)
			if tt.spoof {
				spoof(req)
			}
			rep := getEcho(t, c, req)
			if rep.FrontProto != "HTTP/2.0" || rep.Proto != "HTTP/2.0" {
				t.Errorf("client spoke %s, backend saw %s; want HTTP/2.0 both", rep.FrontProto, rep.Proto)
			}
			want := map[string]string{
				"X-Forwarded-For":   tt.xff,
				"X-Real-Ip":         tt.real,
				"Forwarded":         tt.forwarded,
				"X-Forwarded-Proto": "https",
				"X-Forwarded-Host":  frontName,
			}
			for k, v := range want {
				if got := strings.Join(rep.Header.Values(k), "|"); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if rep.Host != frontName {
				t.Errorf("backend Host = %q, want %q", rep.Host, frontName)
			}
		})
	}
}

// TestForwardingHeadersUnderscoreSpoof: servers that hand headers to
// applications as CGI-style variables (Rack/Puma before 6.4.1, WSGI
// servers, PHP) map "-" and "_" alike, so X_Forwarded_For from the client
// becomes the same HTTP_X_FORWARDED_FOR as the proxy's X-Forwarded-For and
// may win over it (Puma's CVE-2024-45614). The client's underscore
// spellings of the forwarding headers must not reach the backend, on the
// relay (HTTP/2 client) and on the net/http path (HTTP/1.1 client) alike.
func TestForwardingHeadersUnderscoreSpoof(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, echo)
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	for _, h2 := range []bool{true, false} {
		for _, trust := range []bool{false, true} {
			t.Run(fmt.Sprintf("h2=%v trusted=%v", h2, trust), func(t *testing.T) {
				addr := startProxy(t, h, trust).addr
				c, _ := newClient(t, pki, addr, h2, "")
				req := mustRequest(t, "GET", url+"/", nil)
				for _, k := range []string{"X_Forwarded_For", "X_Real_IP", "X-Forwarded_Host", "x_forwarded_proto"} {
					req.Header[k] = []string{"203.0.113.9"}
				}
				rep := getEcho(t, c, req)
				ours := map[string]bool{"x-forwarded-for": true, "x-real-ip": true, "x-forwarded-host": true, "x-forwarded-proto": true}
				for k, v := range rep.Header {
					if strings.Contains(k, "_") && ours[strings.ReplaceAll(strings.ToLower(k), "_", "-")] {
						t.Errorf("backend got %s: %q from the client", k, v)
					}
				}
				if got := rep.Header.Get("X-Forwarded-For"); got != "127.0.0.1" {
					t.Errorf("X-Forwarded-For = %q, want 127.0.0.1", got)
				}
			})
		}
	}
}

func TestH2Backend(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2, false, echo)

	t.Run("verified", func(t *testing.T) {
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2", BackendCAFile: pki.caFile})
		addr := startProxy(t, h, false).addr
		c, _ := newClient(t, pki, addr, true, "")
		rep := getEcho(t, c, mustRequest(t, "GET", url+"/", nil))
		if rep.Proto != "HTTP/2.0" {
			t.Errorf("backend saw %s, want HTTP/2.0", rep.Proto)
		}
	})
	t.Run("https1", func(t *testing.T) {
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "https1", BackendCAFile: pki.caFile})
		addr := startProxy(t, h, false).addr
		c, _ := newClient(t, pki, addr, true, "")
		rep := getEcho(t, c, mustRequest(t, "GET", url+"/", nil))
		if rep.Proto != "HTTP/1.1" {
			t.Errorf("backend saw %s, want HTTP/1.1", rep.Proto)
		}
	})
	t.Run("wrong CA", func(t *testing.T) {
		m := NewMetrics(prometheus.NewRegistry())
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2", BackendCAFile: newTestPKI(t).caFile, Metrics: m})
		addr := startProxy(t, h, false).addr
		c, _ := newClient(t, pki, addr, true, "")
		if code, body := getStatus(t, c, url+"/"); code != http.StatusBadGateway {
			t.Fatalf("status %d %q, want 502", code, body)
		}
		if n := testutil.ToFloat64(m.backendErrors.WithLabelValues("test", frontName, kindUnreachable)); n != 1 {
			t.Errorf("unreachable errors = %v, want 1", n)
		}
	})
	t.Run("wrong server name", func(t *testing.T) {
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2", BackendCAFile: pki.caFile, BackendServerName: "other.test"})
		addr := startProxy(t, h, false).addr
		c, _ := newClient(t, pki, addr, true, "")
		if code, body := getStatus(t, c, url+"/"); code != http.StatusBadGateway {
			t.Fatalf("status %d %q, want 502", code, body)
		}
	})
}

func TestHTTP1(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beHTTP1, false, echo)
	m := NewMetrics(prometheus.NewRegistry())
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", Metrics: m})
	addr := startProxy(t, h, false).addr
	c, _ := newClient(t, pki, addr, false, "")

	rep := getEcho(t, c, mustRequest(t, "POST", url+"/upload", strings.NewReader("hello body")))
	if rep.FrontProto != "HTTP/1.1" || rep.Proto != "HTTP/1.1" {
		t.Errorf("client spoke %s, backend saw %s; want HTTP/1.1 both", rep.FrontProto, rep.Proto)
	}
	if rep.Body != "hello body" {
		t.Errorf("backend got body %q", rep.Body)
	}
	if got := rep.Header.Get("X-Forwarded-For"); got != "127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q", got)
	}

	// A retired snapshot's handler keeps serving the connections it has.
	h.Close()
	getEcho(t, c, mustRequest(t, "GET", url+"/after-close", nil))

	route := frontName
	testnet.WaitFor(t, "2 requests counted", func() bool {
		return testutil.ToFloat64(m.requests.WithLabelValues("test", route, "2xx")) == 2 &&
			testutil.ToFloat64(m.activeStreams.WithLabelValues("test", route)) == 0
	})
}

func TestConcurrentStreams(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	const n = 100
	var arrived atomic.Int32
	all := make(chan struct{})
	// Every request waits until all n are in the backend at once, so the
	// test passes only if the proxy really carries them concurrently.
	be := startBackend(t, pki, beH2C, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/warmup" {
			if arrived.Add(1) == n {
				close(all)
			}
			select {
			case <-all:
			case <-r.Context().Done():
				return
			case <-time.After(20 * time.Second):
				http.Error(w, "not all streams arrived", http.StatusServiceUnavailable)
				return
			}
		}
		echo(w, r)
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	c, dials := newClient(t, pki, addr, true, "")
	getEcho(t, c, mustRequest(t, "GET", url+"/warmup", nil))

	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			rep, err := fetchEcho(c, mustRequest(t, "GET", fmt.Sprintf("%s/s/%d", url, i), nil))
			if err != nil {
				t.Errorf("stream %d: %v", i, err)
			} else if rep.FrontProto != "HTTP/2.0" {
				t.Errorf("stream %d went over %s", i, rep.FrontProto)
			}
		})
	}
	wg.Wait()
	if d := dials.count(); d != 1 {
		t.Errorf("client made %d connections, want 1", d)
	}
}

func TestGRPC(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	var wg sync.WaitGroup
	wg.Go(func() { gs.Serve(ln) })
	t.Cleanup(func() {
		gs.Stop()
		wg.Wait()
	})

	h := newTestHandler(t, pki, Options{Backend: ln.Addr().String(), Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	cc, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pki.pool, ServerName: frontName})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	client := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// Unary, and a status carried only in trailers.
	res, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if res.Status != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check = %v, want SERVING", res.Status)
	}
	_, err = client.Check(ctx, &healthpb.HealthCheckRequest{Service: "unknown"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("Check(unknown) err = %v, want NotFound", err)
	}

	// Server streaming: each status change arrives as it happens.
	hs.SetServingStatus("svc", healthpb.HealthCheckResponse_SERVING)
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	stream, err := client.Watch(watchCtx, &healthpb.HealthCheckRequest{Service: "svc"})
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	for _, want := range []healthpb.HealthCheckResponse_ServingStatus{
		healthpb.HealthCheckResponse_SERVING,
		healthpb.HealthCheckResponse_NOT_SERVING,
	} {
		msg, err := stream.Recv()
		if err != nil {
			t.Fatalf("Watch Recv: %v", err)
		}
		if msg.Status != want {
			t.Fatalf("Watch got %v, want %v", msg.Status, want)
		}
		hs.SetServingStatus("svc", healthpb.HealthCheckResponse_NOT_SERVING)
	}
	stopWatch()
	if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
		t.Errorf("after cancel, Recv err = %v, want Canceled", err)
	}
}

func TestWebSocket(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	var up websocket.Upgrader
	be := startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		for {
			mt, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			if err := c.WriteMessage(mt, msg); err != nil {
				return
			}
		}
	}))
	dial := func(t *testing.T, addr string) (*websocket.Conn, *http.Response, error) {
		d := websocket.Dialer{
			NetDialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			},
			TLSClientConfig:  &tls.Config{RootCAs: pki.pool, ServerName: frontName},
			HandshakeTimeout: 10 * time.Second,
		}
		return d.Dial("wss://"+frontName+"/ws", nil)
	}

	t.Run("http1 backend", func(t *testing.T) {
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1"})
		addr := startProxy(t, h, false).addr
		ws, _, err := dial(t, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		for _, msg := range []string{"hello", "again"} {
			if err := ws.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
				t.Fatal(err)
			}
			_, got, err := ws.ReadMessage()
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != msg {
				t.Fatalf("echo %q, want %q", got, msg)
			}
		}
	})
	t.Run("runs on through a drain until the caller cuts", func(t *testing.T) {
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1"})
		p := startProxy(t, h, false)
		ws, _, err := dial(t, p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		ws.SetReadDeadline(time.Now().Add(20 * time.Second)) // fail rather than hang
		p.cancel()
		// An upgraded connection has no graceful close: like an L4
		// relay it carries on through the drain...
		if err := ws.WriteMessage(websocket.TextMessage, []byte("draining")); err != nil {
			t.Fatal(err)
		}
		if _, got, err := ws.ReadMessage(); err != nil || string(got) != "draining" {
			t.Fatalf("echo during the drain: %q, %v", got, err)
		}
		// ...until the caller closes it at the end of its grace.
		p.cut()
		_, _, err = ws.ReadMessage()
		if ne, ok := err.(net.Error); err == nil || ok && ne.Timeout() {
			t.Fatalf("read on a connection that should be cut: %v", err)
		}
	})
	t.Run("h2c backend refuses", func(t *testing.T) {
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
		addr := startProxy(t, h, false).addr
		ws, res, err := dial(t, addr)
		if err == nil {
			ws.Close()
			t.Fatal("upgrade through an h2c backend succeeded")
		}
		if res == nil || res.StatusCode != http.StatusBadGateway {
			t.Fatalf("res = %v, err = %v; want 502", res, err)
		}
	})
}

func TestBackendErrors(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	route := frontName

	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := closed.Addr().String()
	closed.Close()

	release := make(chan struct{})
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	// Headers at once, then a body that takes longer than the response
	// timeout: the timeout must not cut it.
	const chunks = 6
	stream := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		w.WriteHeader(http.StatusOK)
		rc.Flush()
		for i := range chunks {
			time.Sleep(100 * time.Millisecond)
			fmt.Fprintf(w, "chunk %d\n", i)
			rc.Flush()
		}
	})
	defer close(release) // before the cleanups stop the backends

	for _, proto := range []string{"h2c", "http1"} {
		beKind := map[string]string{"h2c": beH2C, "http1": beHTTP1}[proto]
		slowBE := startBackend(t, pki, beKind, false, slow)
		streamBE := startBackend(t, pki, beKind, false, stream)

		t.Run(proto+"/unreachable", func(t *testing.T) {
			m := NewMetrics(prometheus.NewRegistry())
			h := newTestHandler(t, pki, Options{Backend: deadAddr, Protocol: proto, Metrics: m})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, true, "")
			code, body := getStatus(t, c, url+"/")
			if code != http.StatusBadGateway || body != "bad gateway\n" {
				t.Fatalf("got %d %q, want 502 %q", code, body, "bad gateway\n")
			}
			if n := testutil.ToFloat64(m.backendErrors.WithLabelValues("test", route, kindUnreachable)); n != 1 {
				t.Errorf("unreachable errors = %v, want 1", n)
			}
			testnet.WaitFor(t, "5xx counted", func() bool { return testutil.ToFloat64(m.requests.WithLabelValues("test", route, "5xx")) == 1 })
		})
		t.Run(proto+"/timeout", func(t *testing.T) {
			m := NewMetrics(prometheus.NewRegistry())
			h := newTestHandler(t, pki, Options{Backend: slowBE.addr, Protocol: proto, ResponseTimeout: 200 * time.Millisecond, Metrics: m})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, true, "")
			code, body := getStatus(t, c, url+"/")
			if code != http.StatusGatewayTimeout || body != "gateway timeout\n" {
				t.Fatalf("got %d %q, want 504", code, body)
			}
			if n := testutil.ToFloat64(m.backendErrors.WithLabelValues("test", route, kindTimeout)); n != 1 {
				t.Errorf("timeout errors = %v, want 1", n)
			}
		})
		t.Run(proto+"/stream outlives timeout", func(t *testing.T) {
			h := newTestHandler(t, pki, Options{Backend: streamBE.addr, Protocol: proto, ResponseTimeout: 200 * time.Millisecond})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, true, "")
			code, body := getStatus(t, c, url+"/")
			if code != http.StatusOK || strings.Count(body, "chunk") != chunks {
				t.Fatalf("got %d %q, want 200 with %d chunks", code, body, chunks)
			}
		})
	}
}

func TestSendProxyProtocol(t *testing.T) {
	for _, tt := range []struct {
		proto, backend string
		frontH2        bool
	}{
		{"h2c", beH2C, true},
		{"http1", beHTTP1, false},
		{"h2", beH2, true},
		{"https1", beH2, false},
	} {
		proto := tt.proto
		t.Run(proto, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := startBackend(t, pki, tt.backend, true, echo)
			o := Options{Backend: be.addr, Protocol: proto, SendProxyProtocol: true}
			if tt.backend == beH2 {
				// The PROXY header must precede the TLS handshake.
				o.BackendCAFile = pki.caFile
			}
			h := newTestHandler(t, pki, o)
			addr := startProxy(t, h, false).addr

			// Two clients at once, from different addresses, each with
			// several requests in flight: every request must reach the
			// backend on a connection whose PROXY header names its own
			// client.
			var wg sync.WaitGroup
			var clients []*http.Client
			for _, src := range []string{"127.0.0.2", "127.0.0.3"} {
				c, dials := newClient(t, pki, addr, tt.frontH2, src)
				clients = append(clients, c)
				for i := range 10 {
					wg.Go(func() {
						for j := range 3 {
							rep, err := fetchEcho(c, mustRequest(t, "GET", fmt.Sprintf("%s/%s/%d/%d", url, src, i, j), nil))
							if err != nil {
								t.Errorf("client %s: %v", src, err)
								return
							}
							got, err := netip.ParseAddrPort(rep.ProxySrc)
							if err != nil || got.Addr().String() != src || !dials.has(got) {
								t.Errorf("client %s: request arrived with PROXY source %q", src, rep.ProxySrc)
							}
							if xr := rep.Header.Get("X-Real-Ip"); xr != src {
								t.Errorf("client %s: X-Real-IP %q", src, xr)
							}
						}
					})
				}
			}
			wg.Wait()

			// Backend connections belong to their client connection
			// and close with it.
			if be.open.Load() == 0 {
				t.Error("backend has no open connections while clients are connected")
			}
			for _, c := range clients {
				c.CloseIdleConnections()
			}
			testnet.WaitFor(t, "backend connections to close", func() bool { return be.open.Load() == 0 })
		})
	}
}

func TestServeConnDrain(t *testing.T) {
	for _, tt := range []struct {
		name string
		h2   bool
		cut  bool // the request never finishes; the caller closes conn
	}{
		{"h2", true, false},
		{"http1.1", false, false},
		{"h2 cut", true, true},
		{"http1.1 cut", false, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			started := make(chan struct{}, 1)
			release := make(chan struct{})
			be := startBackend(t, pki, beH2C, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				started <- struct{}{}
				select {
				case <-release:
					io.WriteString(w, "done")
				case <-r.Context().Done():
				}
			}))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
			p := startProxy(t, h, false)
			c, _ := newClient(t, pki, p.addr, tt.h2, "")

			done := getAsync(c, url+"/")
			<-started
			// Cancelling ServeConn's context drains: the request in
			// flight still completes...
			p.cancel()
			time.Sleep(50 * time.Millisecond)
			if !tt.cut {
				close(release)
				r := <-done
				if r.err != nil || r.code != http.StatusOK || r.body != "done" {
					t.Fatalf("in-flight request: %d %q %v; want 200 done", r.code, r.body, r.err)
				}
				return
			}
			// ...unless the caller closes the connection first, as the
			// proxy does when its grace period ends; then the request
			// fails and ServeConn returns.
			defer close(release)
			p.cut()
			if r := <-done; r.err == nil {
				t.Fatalf("request on a cut connection: %d %q", r.code, r.body)
			}
		})
	}
}

// TestServeConnDrainClosesIdleHTTP1: draining closes an HTTP/1.1
// keep-alive connection waiting between requests at once, not at its
// idle timeout; the drain turns keep-alives off rather than calling
// Shutdown, which would drop a first request read after it began.
func TestServeConnDrainClosesIdleHTTP1(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	p := startProxy(t, h, false)

	tc, err := tls.Dial("tcp", p.addr, &tls.Config{RootCAs: pki.pool, ServerName: frontName, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(tc)
	io.WriteString(tc, "GET / HTTP/1.1\r\nHost: "+frontName+"\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || string(b) != "ok" {
		t.Fatalf("before the drain: %d %q", resp.StatusCode, b)
	}

	p.cancel()
	// The idle timeout is minutes away and nothing else closes it.
	if n, err := br.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("idle keep-alive connection after the drain began: read %d, %v; want EOF", n, err)
	}
}

func TestMetricNames(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	rm := m.forRoute("public", "a.example.com")
	rm.requestDone(200, time.Millisecond)
	rm.streamStarted()
	rm.backendError(kindOther)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 4 {
		t.Errorf("gathered %d metric families, want 4", len(mfs))
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

func TestPrefixConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		b.Write([]byte(" world"))
		b.Close()
	}()
	got, err := io.ReadAll(&prefixConn{stallConn: stallConn{Conn: a}, prefix: []byte("hello")})
	if err != nil || string(got) != "hello world" {
		t.Fatalf("read %q, %v", got, err)
	}
}

// TestHTTP1BackendOverlongResponse has an http1 backend answer /long with
// a body longer than its Content-Length, the excess being a whole second
// response, while other clients' requests share the pooled backend
// connections. net/http's transport may hand such a connection, the
// excess still buffered, to the next request, which then gets the excess
// as its response, and every later request on the connection the
// response meant for the one before: one client's data in another's
// response. Each request must get its own response or a 502.
func TestHTTP1BackendOverlongResponse(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)

	backend := testnet.Backend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			var resp string
			if req.URL.Path == "/long" {
				resp = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" +
					"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
			} else {
				resp = fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(req.URL.Path), req.URL.Path)
			}
			if _, err := io.WriteString(c, resp); err != nil {
				return
			}
		}
	})

	h := newTestHandler(t, pki, Options{Backend: backend, Protocol: "http1"})
	addr := startProxy(t, h, false).addr
	c, _ := newClient(t, pki, addr, false, "")
	c.Transport.(*http.Transport).MaxIdleConnsPerHost = 64

	const clients, rounds = 32, 300
	var failed atomic.Bool
	var cw sync.WaitGroup
	for g := range clients {
		cw.Go(func() {
			for i := range rounds {
				if failed.Load() {
					return
				}
				path := fmt.Sprintf("/c%d/%d", g, i)
				if i%2 == g%2 {
					path = "/long"
				}
				res, err := c.Get(url + path)
				if err != nil {
					failed.Store(true)
					t.Errorf("GET %s: %v", path, err)
					return
				}
				b, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil {
					failed.Store(true)
					t.Errorf("GET %s: reading body: %v", path, err)
					return
				}
				if path == "/long" || res.StatusCode == http.StatusBadGateway {
					continue
				}
				if string(b) != path {
					failed.Store(true)
					t.Errorf("GET %s: got %d %q, another request's response", path, res.StatusCode, b)
					return
				}
			}
		})
	}
	cw.Wait()
}

// TestH2CUpgradeNotForwarded sends an HTTP/1.1 request asking to upgrade
// to h2c: the backend must see a plain request, since one that switched
// would take the client's HTTP/2 requests straight off the tunnel, with
// forwarding headers of the client's making.
func TestH2CUpgradeNotForwarded(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "connection=%q upgrade=%q settings=%q", r.Header.Values("Connection"), r.Header.Values("Upgrade"), r.Header.Values("Http2-Settings"))
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1"})
	addr := startProxy(t, h, false).addr
	c, _ := newClient(t, pki, addr, false, "")
	for _, conn := range []string{"Upgrade, HTTP2-Settings", "Upgrade"} {
		req := mustRequest(t, "GET", url+"/", nil)
		req.Header.Set("Connection", conn)
		req.Header.Set("Upgrade", "h2c")
		req.Header.Set("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")
		res, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if want := `connection=[] upgrade=[] settings=[]`; res.StatusCode != http.StatusOK || string(b) != want {
			t.Errorf("Connection: %s: got %d %s, want 200 %s", conn, res.StatusCode, b, want)
		}
	}
}

// TestUpgradeKeepsEarlyClientBytes sends an upgrade request and the first
// bytes of the new protocol in one write, as a client that does not wait
// for the 101 may: the backend must get those bytes too.
func TestUpgradeKeepsEarlyClientBytes(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "Upgrade")
		w.Header().Set("Upgrade", "echo")
		w.WriteHeader(http.StatusSwitchingProtocols)
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		line, err := brw.ReadString('\n')
		if err != nil {
			return
		}
		io.WriteString(conn, "echo: "+line)
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1"})
	addr := startProxy(t, h, false).addr

	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pki.pool, ServerName: frontName, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: "+frontName+"\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", res.StatusCode)
	}
	line, err := br.ReadString('\n')
	if line != "echo: early\n" {
		t.Fatalf("after the 101: %q (%v), want %q", line, err, "echo: early\n")
	}
}
