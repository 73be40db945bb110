package l7

import (
	"bufio"
	"bytes"
	"context"
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

// Request trailers (HTTP/1.1 chunked trailers, HTTP/2 trailing HEADERS)
// reach the backend on the reverse-proxy path as they do on the HTTP/2
// relay.
func TestRequestTrailers(t *testing.T) {
	for _, tc := range []struct {
		backend  string
		clientH2 bool
	}{
		{beH2C, false},
		{beHTTP1, false},
		{beHTTP1, true},
		{beH2C, true}, // the relay
	} {
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
	for _, tc := range []struct {
		backend  string
		clientH2 bool
	}{
		{beH2C, false},
		{beHTTP1, false},
		{beHTTP1, true},
		{beH2C, true}, // the relay
	} {
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
