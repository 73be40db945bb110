package l7

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/portcullis/portcullis/proxyproto"
	"github.com/portcullis/portcullis/testpki"
)

// checkLeaks fails the test if goroutines started during it are still
// running once all its cleanups (registered later, so run earlier) are done.
func checkLeaks(t *testing.T) {
	t.Helper()
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// testPKI adapts testpki's CA to the shape these tests use.
type testPKI struct {
	*testpki.CA
	caFile string
	pool   *x509.CertPool
}

func newTestPKI(t *testing.T) *testPKI {
	ca := testpki.NewCA(t)
	return &testPKI{CA: ca, caFile: ca.CertFile, pool: ca.Pool()}
}

// leaf issues a certificate for names (DNS names or IP literals) and
// returns its cert and key files.
func (p *testPKI) leaf(t *testing.T, names ...string) (certFile, keyFile string) {
	l := p.Leaf(t, names...)
	return l.CertFile, l.KeyFile
}

func (p *testPKI) keyPair(t *testing.T, names ...string) tls.Certificate {
	return p.Leaf(t, names...).Cert
}

const frontName = "app.test" // the SNI and Host clients use

// newTestHandler builds a Handler for the front name with the given
// options filled in around it.
func newTestHandler(t *testing.T, pki *testPKI, o Options) *Handler {
	t.Helper()
	o.CertFile, o.KeyFile = pki.leaf(t, frontName)
	if o.Route == "" {
		o.Listener, o.Route = "test", frontName
	}
	h, err := NewHandler(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// testProxy is a test-only accept loop that does what the real proxy
// does: accept, read the ClientHello record itself, and hand the
// connection and the bytes read to ServeConn.
type testProxy struct {
	addr   string
	cancel context.CancelFunc // the ServeConn context: starts a drain

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// cut closes every connection, as the proxy does when its shutdown grace
// ends.
func (p *testProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

func startProxy(t *testing.T, h *Handler, trust bool) *testProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &testProxy{addr: ln.Addr().String(), cancel: cancel, conns: make(map[net.Conn]struct{})}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.conns[conn] = struct{}{}
			p.mu.Unlock()
			wg.Go(func() {
				defer func() {
					p.mu.Lock()
					delete(p.conns, conn)
					p.mu.Unlock()
				}()
				hello, err := readHello(conn)
				if err != nil {
					conn.Close()
					return
				}
				h.ServeConn(ctx, conn, hello, ConnInfo{
					Client:         conn.RemoteAddr().(*net.TCPAddr).AddrPort(),
					Local:          conn.LocalAddr().(*net.TCPAddr).AddrPort(),
					TrustForwarded: trust,
					SNI:            frontName,
				})
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		cancel()
		// Like the proxy's shutdown: a grace period, then cut.
		done := make(chan struct{})
		go func() {
			wg.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			p.cut()
			<-done
		}
	})
	return p
}

// readHello reads one TLS record: enough for the single-record
// ClientHellos crypto/tls sends.
func readHello(c net.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil {
		return nil, err
	}
	if b[0] != 22 { // handshake record
		return nil, errors.New("not a TLS handshake")
	}
	n := int(b[3])<<8 | int(b[4])
	b = append(b, make([]byte, n)...)
	_, err := io.ReadFull(c, b[5:])
	return b, err
}

// dialLog records the connections a test client made.
type dialLog struct {
	mu     sync.Mutex
	locals []netip.AddrPort
}

func (d *dialLog) add(a netip.AddrPort) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.locals = append(d.locals, a)
}

func (d *dialLog) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.locals)
}

func (d *dialLog) has(a netip.AddrPort) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Contains(d.locals, a)
}

// newClient returns an HTTPS client that sends every request for
// https://app.test/ to the proxy at addr, speaking h2 when h2 is set and
// HTTP/1.1 otherwise, from local address src when set.
func newClient(t *testing.T, pki *testPKI, addr string, h2 bool, src string) (*http.Client, *dialLog) {
	t.Helper()
	dials := new(dialLog)
	d := &net.Dialer{}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				dials.add(c.LocalAddr().(*net.TCPAddr).AddrPort())
			}
			return c, err
		},
		TLSClientConfig: &tls.Config{RootCAs: pki.pool, ServerName: frontName},
		Protocols:       new(http.Protocols),
	}
	if h2 {
		tr.Protocols.SetHTTP2(true)
	} else {
		tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
		tr.Protocols.SetHTTP1(true)
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}, dials
}

// backend kinds for startBackend.
const (
	beH2C   = "h2c"   // HTTP/1.1 and prior-knowledge h2c on plain TCP
	beHTTP1 = "http1" // HTTP/1.1 only
	beH2    = "h2"    // TLS with h2 and http/1.1, cert for 127.0.0.1
)

type proxySrcKey struct{}

// testBackend is a backend server; open counts its open connections.
type testBackend struct {
	addr string
	open atomic.Int32
}

// countConns keeps open up to date; it is the backend server's ConnState.
func (be *testBackend) countConns(_ net.Conn, s http.ConnState) {
	switch s {
	case http.StateNew:
		be.open.Add(1)
	case http.StateClosed, http.StateHijacked:
		be.open.Add(-1)
	}
}

// startBackend serves handler on a loopback port. With readProxy, every
// accepted connection must start with a PROXY header, whose source address
// handlers find with proxySrc.
func startBackend(t *testing.T, pki *testPKI, kind string, readProxy bool, handler http.Handler) *testBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if readProxy {
		ln = &ppListener{Listener: ln}
	}
	srv := &http.Server{
		Handler:   handler,
		Protocols: new(http.Protocols),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if tc, ok := c.(*tls.Conn); ok {
				c = tc.NetConn()
			}
			if pc, ok := c.(*ppConn); ok {
				return context.WithValue(ctx, proxySrcKey{}, pc.src)
			}
			return ctx
		},
		ErrorLog: nopLogger(),
	}
	be := &testBackend{addr: ln.Addr().String()}
	srv.ConnState = be.countConns
	srv.Protocols.SetHTTP1(true)
	var wg sync.WaitGroup
	switch kind {
	case beH2C:
		srv.Protocols.SetUnencryptedHTTP2(true)
		wg.Go(func() { srv.Serve(ln) })
	case beHTTP1:
		wg.Go(func() { srv.Serve(ln) })
	case beH2:
		srv.Protocols.SetHTTP2(true)
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{pki.keyPair(t, "127.0.0.1")}}
		wg.Go(func() { srv.ServeTLS(ln, "", "") })
	}
	t.Cleanup(func() {
		srv.Close()
		wg.Wait()
	})
	return be
}

func proxySrc(r *http.Request) netip.AddrPort {
	v, _ := r.Context().Value(proxySrcKey{}).(netip.AddrPort)
	return v
}

type ppListener struct{ net.Listener }

type ppConn struct {
	net.Conn
	src netip.AddrPort
}

// Accept reads the PROXY header of each connection before handing it on;
// a connection without one is dropped, which the test then notices as a
// failed request.
func (l *ppListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		hdr, err := proxyproto.Read(c)
		c.SetReadDeadline(time.Time{})
		if err != nil || hdr.Command != proxyproto.Proxy {
			c.Close()
			continue
		}
		return &ppConn{Conn: c, src: hdr.Source}, nil
	}
}

// echo is the backend handler most tests use: it reports what it received.
type echoReply struct {
	Proto    string      `json:"proto"`
	Host     string      `json:"host"`
	Header   http.Header `json:"header"`
	Body     string      `json:"body"`
	ProxySrc string      `json:"proxy_src"`

	FrontProto string `json:"-"`
}

var echo = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rep := echoReply{Proto: r.Proto, Host: r.Host, Header: r.Header, Body: string(body)}
	if src := proxySrc(r); src.IsValid() {
		rep.ProxySrc = src.String()
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(rep)
})

// fetchEcho sends req and decodes the echo backend's reply; FrontProto is
// the protocol the client spoke to the proxy. Safe in any goroutine.
func fetchEcho(c *http.Client, req *http.Request) (echoReply, error) {
	var rep echoReply
	res, err := c.Do(req)
	if err != nil {
		return rep, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		return rep, fmt.Errorf("status %d: %s", res.StatusCode, b)
	}
	if err := json.NewDecoder(res.Body).Decode(&rep); err != nil {
		return rep, err
	}
	rep.FrontProto = res.Proto
	return rep, nil
}

func getEcho(t *testing.T, c *http.Client, req *http.Request) echoReply {
	t.Helper()
	rep, err := fetchEcho(c, req)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func mustRequest(t *testing.T, method, url string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// getStatus does a GET and returns the status code and body.
func getStatus(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	res, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

// getResult is the outcome of a GET run in the background.
type getResult struct {
	code int
	body string
	err  error
}

// getAsync runs GET url on c in a goroutine of its own, for a test that
// acts while the request is in flight.
func getAsync(c *http.Client, url string) <-chan getResult {
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		done := make(chan getResult, 1)
		done <- getResult{err: err}
		return done
	}
	return doAsync(c, req)
}

// doAsync sends req on c in a goroutine of its own and delivers the
// whole response.
func doAsync(c *http.Client, req *http.Request) <-chan getResult {
	done := make(chan getResult, 1)
	go func() {
		res, err := c.Do(req)
		if err != nil {
			done <- getResult{err: err}
			return
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		done <- getResult{res.StatusCode, string(b), err}
	}()
	return done
}

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }
