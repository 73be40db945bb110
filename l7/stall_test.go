package l7

import (
	"bytes"
	"crypto/tls"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testnet"
	"golang.org/x/net/http2"
)

// endless is a backend handler that streams a body until its writes fail
// or the request ends; running counts the handlers still streaming.
func endless(running *atomic.Int32) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		running.Add(1)
		defer running.Add(-1)
		chunk := bytes.Repeat([]byte("x"), 32<<10)
		rc := http.NewResponseController(w)
		for r.Context().Err() == nil {
			if _, err := w.Write(chunk); err != nil {
				return
			}
			if rc.Flush() != nil {
				return
			}
		}
	})
}

// An HTTP/2 client that opens its flow-control windows wide, asks for an
// endless download and never reads must not pin its connection, its
// backend connection and the relay's goroutines for ever: once writes to
// it have made no progress for idle_timeout, the relay gives up.
func TestRelayClientNeverReads(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	var running atomic.Int32
	be := startH2CBackend(t, nil, endless(&running))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", IdleTimeout: 300 * time.Millisecond})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	p.must(p.write(func() error { return p.fr.WriteWindowUpdate(0, 1<<31-1-65535) }))
	p.get(1, "/")
	// From here on the client reads nothing.
	waitCut(t, &running, be, "stalled")
}

// The same on the general path: an HTTP/1.1 client (and an HTTP/2 client
// of an http1 backend, served by net/http's HTTP/2 server) that asks for
// a download and never reads is closed once writes to it have stalled for
// idle_timeout.
func TestGeneralPathClientNeverReads(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		name := "http1"
		if h2 {
			name = "h2"
		}
		t.Run(name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			var running atomic.Int32
			be := startBackend(t, pki, beHTTP1, false, endless(&running))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", IdleTimeout: 300 * time.Millisecond})
			addr := startProxy(t, h, false).addr
			if h2 {
				p := dialRaw(t, pki, addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
				p.must(p.write(func() error { return p.fr.WriteWindowUpdate(0, 1<<31-1-65535) }))
				p.get(1, "/")
			} else {
				tc, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pki.pool, ServerName: frontName, NextProtos: []string{"http/1.1"}})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { tc.Close() })
				if _, err := io.WriteString(tc, "GET / HTTP/1.1\r\nHost: "+frontName+"\r\n\r\n"); err != nil {
					t.Fatal(err)
				}
			}
			// From here on the client reads nothing.
			waitCut(t, &running, be, "stalled")
		})
	}
}

// A backend that opens its windows wide and then never reads an upload
// must not pin the relay: the client gets its answer (the README promises
// 504 for "a backend that neither reads nor answers") instead of waiting
// for ever with its connection, and the relay's goroutines, held.
func TestRelayBackendNeverReads(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	stop := make(chan struct{})
	addr := startRawBackend(t, nil, []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1}},
		func(p *h2Peer) {
			p.must(p.write(func() error { return p.fr.WriteWindowUpdate(0, 1<<31-1-65535) }))
			<-stop // and never read again
		})
	t.Cleanup(func() { close(stop) }) // runs before the backend's cleanup
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c",
		ResponseTimeout: 300 * time.Millisecond, IdleTimeout: 300 * time.Millisecond})
	p.must(p.writeHeaders(1, false, reqFields("POST", "/upload")))
	// Pump the body on a framer of its own, ignoring flow control (the
	// backend granted everything); each frame is one write, so the
	// reader below never sees a torn frame.
	pumped := make(chan error, 1)
	go func() {
		fr := http2.NewFramer(p.conn, nil)
		chunk := make([]byte, 16<<10)
		for {
			if err := fr.WriteData(1, false, chunk); err != nil {
				pumped <- err
				return
			}
		}
	}()
	s := p.response(1) // fails the test after rawWait without a frame
	if st := s.status(); st != "504" && st != "502" {
		t.Fatalf("stream 1: status %q; frames: %s", st, p.history())
	}
	p.conn.Close()
	recv(t, pumped, "the upload to stop")
}

// With default flow-control windows the same client stalls the backend by
// flow control instead of TCP: the relay writes 64 KiB the socket absorbs,
// then nothing moves in either direction. A stream is open, so the idle
// timeout never fires, and the connection and its backend connection are
// held for ever (README: "a relay silent in both directions this long is
// closed").
func TestRelaySilentStreamIdles(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	var running atomic.Int32
	be := startH2CBackend(t, nil, endless(&running))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", IdleTimeout: 300 * time.Millisecond})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr)
	p.get(1, "/")
	// From here on the client reads nothing.
	waitCut(t, &running, be, "silent")
}

// The general path's HTTP/2 server with default windows: a client that
// never reads stalls the handler on flow control, a stream stays open,
// and net/http's HTTP/2 idle timeout never fires.
func TestGeneralPathH2SilentStreamIdles(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	var running atomic.Int32
	be := startBackend(t, pki, beHTTP1, false, endless(&running))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", IdleTimeout: 300 * time.Millisecond})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr)
	p.get(1, "/")
	waitCut(t, &running, be, "silent")
}

// waitCut waits for the backend handler counted by running to start,
// then for the proxy to cut the what connection: the handler ends and
// the backend has no connection left open.
func waitCut(t *testing.T, running *atomic.Int32, be *testBackend, what string) {
	t.Helper()
	testnet.WaitFor(t, "the backend handler to start", func() bool { return running.Load() == 1 })
	testnet.WaitFor(t, "the "+what+" connection to be closed (backend handler to end)", func() bool {
		return running.Load() == 0 && be.open.Load() == 0
	})
}
