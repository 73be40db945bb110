package l7

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// An HTTP/1.1 client whose upload is still going when the backend's
// response starts (a streaming transform, a progress report, a backend
// that answers first and then reads) must get its whole body to the
// backend: the proxy is still relaying it. net/http's HTTP/1.1 server
// by default consumes and throws away up to 256 KiB of an unfinished
// request body when a handler starts its response, which here would
// steal bytes from under the proxy.
func TestHTTP1BodyStillMovingWhenResponseStarts(t *testing.T) {
	for _, kind := range []string{beH2C, beHTTP1} {
		t.Run(kind, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := startBackend(t, pki, kind, false, startsThenCounts())
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: kind})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, false, "")

			// A failsafe only: with the bug the proxy waits for body
			// bytes the client sends only after it sees the response.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			pr, pw := io.Pipe()
			stop := context.AfterFunc(ctx, func() { pw.CloseWithError(ctx.Err()) })
			defer stop()
			req, err := http.NewRequestWithContext(ctx, "POST", url+"/stream", pr)
			if err != nil {
				t.Fatal(err)
			}
			first, rest := bytes.Repeat([]byte("a"), 1000), bytes.Repeat([]byte("b"), 300_000)
			// Writes on a pipe are gated one after the other; only the
			// byte count matters here.
			go pw.Write(first)
			res, err := c.Do(req)
			if err != nil {
				pw.Close()
				t.Fatalf("request: %v", err)
			}
			defer res.Body.Close()
			br := bufio.NewReader(res.Body)
			line, err := br.ReadString('\n')
			if err != nil || line != "started\n" {
				pw.CloseWithError(err)
				t.Fatalf("first response line %q, %v", line, err)
			}
			// The response has started; now the rest of the upload.
			if _, err := pw.Write(rest); err != nil {
				t.Fatalf("writing the rest of the body: %v", err)
			}
			pw.Close()
			tail, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("reading the response: %v (got %q)", err, tail)
			}
			want := fmt.Sprintf("got %d bytes, err <nil>\n", len(first)+len(rest))
			if string(tail) != want {
				t.Errorf("backend reported %q, want %q", tail, want)
			}
		})
	}
}

// trailerPaths are the client/backend pairs the trailer tests run: both
// reverse-proxy paths and the HTTP/2 relay.
var trailerPaths = []struct {
	backend  string
	clientH2 bool
}{
	{beH2C, false},
	{beHTTP1, false},
	{beHTTP1, true},
	{beH2C, true}, // the relay
}

// Request trailers (HTTP/1.1 chunked trailers, HTTP/2 trailing HEADERS)
// reach the backend on the reverse-proxy path as they do on the HTTP/2
// relay.
func TestRequestTrailers(t *testing.T) {
	for _, tc := range trailerPaths {
		t.Run(fmt.Sprintf("%s/h2client=%v", tc.backend, tc.clientH2), func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := startBackend(t, pki, tc.backend, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, err := io.ReadAll(r.Body)
				fmt.Fprintf(w, "body=%q err=%v trailer=%q", body, err, r.Trailer.Get("X-Checksum"))
			}))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.backend})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, tc.clientH2, "")

			pr, pw := io.Pipe()
			req := mustRequest(t, "PUT", url+"/upload", pr)
			req.Trailer = http.Header{"X-Checksum": nil}
			go func() {
				io.WriteString(pw, "hello body")
				req.Trailer.Set("X-Checksum", "abc123")
				pw.Close()
			}()
			res, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if want := `body="hello body" err=<nil> trailer="abc123"`; !strings.EqualFold(string(got), want) {
				t.Errorf("backend saw %s\nwant         %s", got, want)
			}
		})
	}
}

// Forwarding headers sent as request trailers are dropped as they are in
// the header section: a backend that merges trailers into the headers
// (as Apache once did, CVE-2013-5704) would otherwise take the client's
// word for its address.
func TestRequestTrailersForwardingHeaders(t *testing.T) {
	for _, tc := range trailerPaths {
		t.Run(fmt.Sprintf("%s/h2client=%v", tc.backend, tc.clientH2), func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := startBackend(t, pki, tc.backend, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				fmt.Fprintf(w, "xff=%q real=%q sum=%q", r.Trailer.Get("X-Forwarded-For"), r.Trailer.Get("X-Real-Ip"), r.Trailer.Get("X-Checksum"))
			}))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.backend})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, tc.clientH2, "")

			req := mustRequest(t, "PUT", url+"/upload", io.NopCloser(strings.NewReader("hello body")))
			req.Trailer = http.Header{"X-Forwarded-For": {"203.0.113.9"}, "X-Real-Ip": {"203.0.113.9"}, "X-Checksum": {"abc123"}}
			res, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if want := `xff="" real="" sum="abc123"`; string(got) != want {
				t.Errorf("backend saw trailers %s\nwant                %s", got, want)
			}
		})
	}
}

// startsThenCounts answers "started\n" at once, in full duplex, then
// reads the whole request body and reports its size: a backend whose
// response begins while the upload is still arriving.
func startsThenCounts() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		rc.EnableFullDuplex()
		io.WriteString(w, "started\n")
		rc.Flush()
		n, err := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "got %d bytes, err %v\n", n, err)
	})
}

// rawH1Backend is an http1 backend that answers every request with resp,
// written as is on the hijacked connection, which it then closes: a
// backend that breaks HTTP/1.1 in ways net/http's server will not.
func rawH1Backend(t *testing.T, pki *testPKI, resp string) *testBackend {
	t.Helper()
	return startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString(resp)
		brw.Flush()
	}))
}

// rawH2Backend is an h2c backend that answers every request with respond,
// frame by frame.
func rawH2Backend(t *testing.T, respond func(p *h2Peer, id uint32)) *testBackend {
	t.Helper()
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, _ *h2Stream) { respond(p, id) })
	})
	return &testBackend{addr: addr}
}

// Trailers that may not be trailers (RFC 9110, 6.5.1) — framing,
// routing, connection fields — are not passed on to the client when a
// backend sends them undeclared, as net/http's HTTP/2 server already
// drops them: its HTTP/1.1 server wrote them into the chunked trailer
// section, where a client that merges trailers into the header section
// (as Apache once did, CVE-2013-5704) believes them.
func TestResponseTrailersNotAllowed(t *testing.T) {
	bad := []string{"content-length", "99", "transfer-encoding", "chunked", "host", "evil.test", "connection", "close", "set-cookie", "ok=1", "x-checksum", "abc123"}
	for _, tc := range []struct {
		name    string
		backend func(t *testing.T, pki *testPKI) *testBackend
		proto   string
	}{
		{"h2c", func(t *testing.T, _ *testPKI) *testBackend {
			return rawH2Backend(t, func(p *h2Peer, id uint32) {
				p.writeHeaders(id, false, fields(":status", "200"))
				p.write(func() error { return p.fr.WriteData(id, false, []byte("body")) })
				p.writeHeaders(id, true, fields(bad...))
			})
		}, beH2C},
		{"http1", func(t *testing.T, pki *testPKI) *testBackend {
			var tr strings.Builder
			for i := 0; i < len(bad); i += 2 {
				fmt.Fprintf(&tr, "%s: %s\r\n", bad[i], bad[i+1])
			}
			return rawH1Backend(t, pki, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n"+tr.String()+"\r\n")
		}, beHTTP1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := tc.backend(t, pki)
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.proto})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, false, "")

			res, err := c.Get(url + "/")
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil || string(body) != "body" {
				t.Fatalf("body %q, %v", body, err)
			}
			want := http.Header{"Set-Cookie": {"ok=1"}, "X-Checksum": {"abc123"}}
			if fmt.Sprint(res.Trailer) != fmt.Sprint(want) {
				t.Errorf("trailers %v, want %v", res.Trailer, want)
			}
		})
	}
}

// A backend's status outside what HTTP can carry (net/http's transports
// take any three digits from an HTTP/1.1 backend and any number from an
// HTTP/2 one) gets the client 502, not a connection closed without a
// response, which is what net/http's server does when asked to write it.
func TestBackendStatusOutOfRange(t *testing.T) {
	h2Status := func(status string) func(t *testing.T, pki *testPKI) *testBackend {
		return func(t *testing.T, _ *testPKI) *testBackend {
			return rawH2Backend(t, func(p *h2Peer, id uint32) {
				p.writeHeaders(id, false, fields(":status", status, "content-length", "2"))
				p.write(func() error { return p.fr.WriteData(id, true, []byte("ok")) })
			})
		}
	}
	for _, tc := range []struct {
		name     string
		backend  func(t *testing.T, pki *testPKI) *testBackend
		proto    string
		clientH2 bool
	}{
		{"http1/099", func(t *testing.T, pki *testPKI) *testBackend {
			return rawH1Backend(t, pki, "HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok")
		}, beHTTP1, false},
		{"http1/099/h2client", func(t *testing.T, pki *testPKI) *testBackend {
			return rawH1Backend(t, pki, "HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok")
		}, beHTTP1, true},
		{"h2c/042", h2Status("042"), beH2C, false},
		{"h2c/1000", h2Status("1000"), beH2C, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := tc.backend(t, pki)
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.proto})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, tc.clientH2, "")
			res, err := c.Get(url + "/")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusBadGateway {
				t.Errorf("status %d %q, want 502", res.StatusCode, body)
			}
		})
	}
}

// Informational responses reach the client only when it can read them: an
// HTTP/1.0 client gets none (RFC 9110, 15.2), as the backend, spoken to
// in HTTP/1.1, cannot know; and a 101 from an HTTP/2 backend, which
// HTTP/2 does not have (RFC 9113, 8.6) and net/http's transport hands on
// as informational, is not taken for the final response.
func TestInformationalResponses(t *testing.T) {
	for _, tc := range []struct {
		name   string
		status string // of the informational response
		proto  string // the client's request line
		want   []int  // the responses the client reads, in order
	}{
		{"103/HTTP1.1", "103", "HTTP/1.1", []int{103, 200}},
		{"103/HTTP1.0", "103", "HTTP/1.0", []int{200}},
		{"100/HTTP1.0", "100", "HTTP/1.0", []int{200}},
		{"101/HTTP1.1", "101", "HTTP/1.1", []int{200}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := rawH2Backend(t, func(p *h2Peer, id uint32) {
				p.writeHeaders(id, false, fields(":status", tc.status, "link", "</style.css>; rel=preload"))
				p.writeHeaders(id, false, fields(":status", "200", "content-length", "2"))
				p.write(func() error { return p.fr.WriteData(id, true, []byte("ok")) })
			})
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: beH2C})
			addr := startProxy(t, h, false).addr

			conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pki.pool, ServerName: frontName, NextProtos: []string{"http/1.1"}})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(rawWait))
			fmt.Fprintf(conn, "GET / %s\r\nHost: %s\r\n\r\n", tc.proto, frontName)
			br := bufio.NewReader(conn)
			var got []int
			for {
				res, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("after %v: %v", got, err)
				}
				got = append(got, res.StatusCode)
				if res.StatusCode >= 200 || res.StatusCode == http.StatusSwitchingProtocols {
					break
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("responses %v, want %v", got, tc.want)
			}
		})
	}
}
