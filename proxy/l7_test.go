package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/portcullis/portcullis/proxyproto"
	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

// h2cBackend answers every request with its name and the forwarding
// headers it received.
func h2cBackend(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s xff=%s proto=%s", name, r.Proto, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"))
	})
	srv := &http.Server{Handler: h2c.NewHandler(h, &http2.Server{}), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	return ln.Addr().String()
}

// webRouteTOML is an L7 route for web.test to an h2c backend.
func webRouteTOML(backend, cert, key string) string {
	return fmt.Sprintf(`
  [[listener.route]]
  sni = "web.test"
  mode = "l7"
  backend = %q
  tls_cert = %q
  tls_key = %q
`, backend, cert, key)
}

func h2Client(ca *testpki.CA, dial func() (net.Conn, error)) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http2.Transport{
			TLSClientConfig: &tls.Config{RootCAs: ca.Pool()},
			DialTLSContext: func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
				c, err := dial()
				if err != nil {
					return nil, err
				}
				tc := tls.Client(c, cfg)
				if err := tc.HandshakeContext(ctx); err != nil {
					c.Close()
					return nil, err
				}
				return tc, nil
			},
		},
	}
}

func get(t *testing.T, c *http.Client, url string) string {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("%s: status %d: %s", url, resp.StatusCode, b)
	}
	return string(b)
}

func TestL4AndL7OnOneListener(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	l4 := newTLSBackend(t, ca, "L4", "tcp.test")
	web := h2cBackend(t, "WEB")
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+
		routeTOML("tcp.test", l4.addr())+webRouteTOML(web, leaf.CertFile, leaf.KeyFile))
	addr := h.addr("l")

	c, greeting := dialTLS(t, addr, "tcp.test", ca)
	c.Close()
	if greeting != "L4" {
		t.Fatalf("L4 route reached %q", greeting)
	}
	client := h2Client(ca, func() (net.Conn, error) { return net.Dial("tcp", addr) })
	body := get(t, client, "https://web.test/")
	if want := "WEB HTTP/2.0 xff=127.0.0.1 proto=https"; body != want {
		t.Fatalf("L7 answer %q, want %q", body, want)
	}
	client.CloseIdleConnections()
}

// TestL7SeesProxyHeaderAddress checks that the address from a trusted
// PROXY header is what the L7 forwarding headers carry.
func TestL7SeesProxyHeaderAddress(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	web := h2cBackend(t, "WEB")
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+
		"proxy_protocol = true\nproxy_protocol_trusted = [\"127.0.0.1/32\"]\n"+
		webRouteTOML(web, leaf.CertFile, leaf.KeyFile))
	addr := h.addr("l")
	client := h2ClientVia(ca, addr, netip.MustParseAddrPort("203.0.113.50:40000"))
	defer client.CloseIdleConnections()
	if body := get(t, client, "https://web.test/"); body != "WEB HTTP/2.0 xff=203.0.113.50 proto=https" {
		t.Fatalf("answer %q", body)
	}
}

// TestL7CertificateChangesOnReload replaces the certificate files in
// place; the next reload must serve the new certificate.
func TestL7CertificateChangesOnReload(t *testing.T) {
	ca := testpki.NewCA(t)
	first, second := ca.Leaf(t, "web.test"), ca.Leaf(t, "web.test")
	web := h2cBackend(t, "WEB")
	dir := t.TempDir()
	certFile, keyFile := dir+"/web.pem", dir+"/web-key.pem"
	install := func(l testpki.Leaf) {
		for src, dst := range map[string]string{l.CertFile: certFile, l.KeyFile: keyFile} {
			b, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(dst, b, 0o600)
		}
	}
	install(first)
	cfg := "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n" + webRouteTOML(web, certFile, keyFile)
	h := startProxy(t, cfg)
	serial := func() string {
		c, err := tls.Dial("tcp", h.addr("l"), &tls.Config{ServerName: "web.test", RootCAs: ca.Pool(), NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	if got := serial(); got != first.Cert.Leaf.SerialNumber.String() {
		t.Fatalf("serving serial %s, want the first certificate's", got)
	}
	install(second)
	h.apply(cfg) // same text; the reload reloads the files
	if got := serial(); got != second.Cert.Leaf.SerialNumber.String() {
		t.Fatalf("after reload serving serial %s, want the second certificate's", got)
	}
}

// TestForwardedTrustUsesProxyHeaderClient: an L4 load balancer in front
// of the listener sends PROXY headers; it cannot add HTTP headers (TLS
// goes through it untouched), so the headers come from the client the
// PROXY header names. The operator trusts the load balancer's network for
// forwarding headers too. An internet client behind it, not in
// forwarded_trusted, must still not be able to choose the X-Forwarded-For
// the backend sees.
func TestForwardedTrustUsesProxyHeaderClient(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	web := h2cBackend(t, "WEB")
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+
		"proxy_protocol = true\nproxy_protocol_trusted = [\"127.0.0.1/32\"]\n"+
		"forwarded_trusted = [\"127.0.0.1/32\"]\n"+
		webRouteTOML(web, leaf.CertFile, leaf.KeyFile))
	addr := h.addr("l")
	client := h2ClientVia(ca, addr, netip.MustParseAddrPort("203.0.113.50:40000"))
	defer client.CloseIdleConnections()
	req, _ := http.NewRequest("GET", "https://web.test/", nil)
	req.Header.Set("X-Forwarded-For", "198.51.100.66")
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 512)
	n, _ := res.Body.Read(b)
	res.Body.Close()
	if body := string(b[:n]); body != "WEB HTTP/2.0 xff=203.0.113.50 proto=https" {
		t.Fatalf("answer %q: the untrusted client 203.0.113.50 set X-Forwarded-For", body)
	}
}

// h2ClientVia is an HTTP/2 client whose every connection to addr starts
// with a PROXY v2 header naming src as the client, as a load balancer in
// front of the listener would send.
func h2ClientVia(ca *testpki.CA, addr string, src netip.AddrPort) *http.Client {
	return h2Client(ca, func() (net.Conn, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		if err := proxyproto.WriteV2(c, src, netip.MustParseAddrPort("192.0.2.1:443"), ""); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	})
}

// TestL7RouteBytes: an L7 route counts its bytes too, as the client's
// side of the connection carried them (TLS included), once the
// connection ends.
func TestL7RouteBytes(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	web := h2cBackend(t, "WEB")
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+webRouteTOML(web, leaf.CertFile, leaf.KeyFile))
	addr := h.addr("l")
	var sent, received atomic.Int64 // on the client's socket, as the client counts them
	client := h2Client(ca, func() (net.Conn, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: c, sent: &sent, received: &received}, nil
	})
	for range 3 {
		get(t, client, "https://web.test/")
	}
	client.CloseIdleConnections()
	testnet.WaitFor(t, "the L7 route's bytes to be counted", func() bool {
		return h.routeBytes("l", "web.test", "client_to_backend") > 0
	})
	// The client stops reading at its close, so the proxy may have sent
	// a little more (a GOAWAY, a close_notify) than the client read.
	if in := h.routeBytes("l", "web.test", "client_to_backend"); in != float64(sent.Load()) {
		t.Errorf("client_to_backend = %v, want the %d bytes the client sent", in, sent.Load())
	}
	if out := h.routeBytes("l", "web.test", "backend_to_client"); out < float64(received.Load()) {
		t.Errorf("backend_to_client = %v, want at least the %d bytes the client received", out, received.Load())
	}
	// The backend connection was dialed once and pooled.
	if got := histogramCount(t, h, "l", "web.test"); got != 1 {
		t.Errorf("%d backend dials observed, want 1 (one pooled backend connection)", got)
	}
}

// histogramCount is how many dials the route's dial latency histogram
// has observed.
func histogramCount(t *testing.T, h *harness, listener, route string) uint64 {
	t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "portcullis_backend_dial_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["listener"] == listener && labels["route"] == route {
				return m.GetHistogram().GetSampleCount()
			}
		}
	}
	return 0
}

// countingConn counts the bytes a client sends and receives.
type countingConn struct {
	net.Conn
	sent, received *atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.sent.Add(int64(n))
	return n, err
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.received.Add(int64(n))
	return n, err
}

// TestRouteLeavingL7LeavesNoL7Series: a route switched from mode = "l7"
// to "l4" no longer serves HTTP, so its portcullis_l7_* series go, and
// once the route is removed nothing labelled with it is left exported.
// The route's own series (connections, bytes) stay while it exists.
func TestRouteLeavingL7LeavesNoL7Series(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	web := h2cBackend(t, "WEB")
	head := "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n" + routeTOML("keep.test", web)
	h := startProxy(t, head+webRouteTOML(web, leaf.CertFile, leaf.KeyFile))
	l7Series := func() []string {
		var out []string
		for _, s := range h.seriesLabelled("web.test") {
			if strings.HasPrefix(s, "portcullis_l7_") {
				out = append(out, s)
			}
		}
		return out
	}
	if len(l7Series()) == 0 {
		t.Fatal("no portcullis_l7_* series for the L7 route")
	}

	h.apply(head + routeTOML("web.test", web)) // now L4
	if left := l7Series(); len(left) > 0 {
		t.Fatalf("route is L4 now, but %d L7 series are still exported:\n%s", len(left), strings.Join(left, "\n"))
	}
	h.apply(head) // and gone
	if left := h.seriesLabelled("web.test"); len(left) > 0 {
		t.Fatalf("route removed, but %d series are still exported:\n%s", len(left), strings.Join(left, "\n"))
	}
}

// TestL7CoalescedRequestMisdirected: browsers reuse an HTTP/2 connection
// for another host its certificate covers that resolves to the same
// address (RFC 9113, 9.1.1), so with one wildcard or multi-name
// certificate on several L7 routes, requests for api.test arrive on a
// connection that SNI routed to web.test. They must not reach web.test's
// backend: 421 Misdirected Request sends the client to a connection of
// its own (RFC 9110, 15.5.20). A host that routes where the connection
// went is served as usual, on both the relay and the net/http path.
func TestL7CoalescedRequestMisdirected(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test", "api.test", "old.test", "*.wild.test")
	l7Route := func(sni, backend, proto string) string {
		return routeTOML(sni, backend, `  mode = "l7"`, fmt.Sprintf("  tls_cert = %q\n  tls_key = %q\n  backend_protocol = %q", leaf.CertFile, leaf.KeyFile, proto))
	}
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+
		l7Route("web.test", h2cBackend(t, "WEB"), "h2c")+
		l7Route("api.test", h2cBackend(t, "API"), "h2c")+
		l7Route("old.test", h2cBackend(t, "OLD"), "http1")+
		l7Route("*.wild.test", h2cBackend(t, "WILD"), "h2c"))
	addr := h.addr("l")

	for _, tc := range []struct {
		sni, host string
		status    int
		body      string // prefix
	}{
		{"web.test", "web.test", 200, "WEB"},
		{"web.test", "api.test", http.StatusMisdirectedRequest, ""},
		{"web.test", "API.test.:443", http.StatusMisdirectedRequest, ""},
		{"old.test", "api.test", http.StatusMisdirectedRequest, ""},
		{"a.wild.test", "b.wild.test", 200, "WILD"},
		{"web.test", "127.0.0.1", 200, "WEB"}, // no SNI can name an address
	} {
		// One connection, as a browser's coalescing would use it.
		c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: tc.sni, RootCAs: ca.Pool(), NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		cc, err := (&http2.Transport{}).NewClientConn(c)
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest("GET", "https://"+tc.host+"/", nil)
		res, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatalf("SNI %s, host %s: %v", tc.sni, tc.host, err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		cc.Close()
		if res.StatusCode != tc.status || !strings.HasPrefix(string(b), tc.body) {
			t.Errorf("SNI %s, host %s: %d %q, want %d %q", tc.sni, tc.host, res.StatusCode, b, tc.status, tc.body)
		}
	}
}

// TestL7DrainServesConnectionAcceptedBefore: a client accepted before
// the drain began, whose ClientHello arrives after, completes its TLS
// handshake and, over HTTP/1.1, gets its request answered (keep-alive
// then ends with the drain), as the same client on an L4 route would be
// relayed. The handshake used to be cancelled with the drain, which the
// client saw as EOF. (An HTTP/2 client is checked for its handshake
// only: the drain then sends it GOAWAY, which says no request was
// processed.)
func TestL7DrainServesConnectionAcceptedBefore(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+webRouteTOML(h2cBackend(t, "WEB"), leaf.CertFile, leaf.KeyFile))
	addr := h.addr("l")
	dial := func(proto string) *tls.Conn {
		raw, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		raw.SetDeadline(time.Now().Add(30 * time.Second))
		tc := tls.Client(raw, &tls.Config{RootCAs: ca.Pool(), ServerName: "web.test", NextProtos: []string{proto}})
		t.Cleanup(func() { tc.Close() })
		return tc
	}
	h1, h2 := dial("http/1.1"), dial("h2")
	testnet.WaitFor(t, "both connections accepted", func() bool { return h.srv.Status()[0].Active == 2 })

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- h.srv.Shutdown(ctx) }()
	testnet.WaitFor(t, "the listener to close", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err != nil
	})

	if err := h2.Handshake(); err != nil {
		t.Errorf("h2: TLS handshake during the drain: %v", err)
	}
	h2.Close()
	if err := h1.Handshake(); err != nil {
		t.Fatalf("http/1.1: TLS handshake during the drain: %v", err)
	}
	io.WriteString(h1, "GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(h1), nil)
	if err != nil {
		t.Fatalf("http/1.1: request during the drain: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.HasPrefix(string(body), "WEB ") {
		t.Fatalf("http/1.1: during the drain got %d %q", resp.StatusCode, body)
	}
	h1.Close()
	if err := <-drained; err != nil {
		t.Fatalf("Shutdown = %v, want nil: every connection finished", err)
	}
}
