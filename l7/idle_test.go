package l7

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/portcullis/portcullis/testnet"
)

// idleTestTimeout is the idle timeout of the tests below; tick is the
// pace of the ones whose traffic keeps moving, well inside it: a tenth,
// so that a scheduling pause of most of a timeout on a loaded machine
// (the race detector, packages tested in parallel) is not read as
// silence.
const (
	idleTestTimeout = 600 * time.Millisecond
	idleTestTick    = idleTestTimeout / 10
	idleTestTicks   = 30 // 1.8 s: three idle timeouts
)

// silentMidBody is a backend handler that sends response headers and the
// start of a body of unknown length, then goes silent until the request
// ends; running counts the handlers still waiting.
func silentMidBody(running *atomic.Int32) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		running.Add(1)
		defer running.Add(-1)
		io.WriteString(w, "partial\n")
		http.NewResponseController(w).Flush()
		<-r.Context().Done()
	})
}

// On the general path, a backend that sends response headers and then
// goes silent mid-body must not hold the client connection, the handler
// and the backend connection for ever: once nothing has come from it for
// idle_timeout, the response is cut (README: "a relay silent in both
// directions this long is closed"; nginx's proxy_read_timeout).
func TestGeneralPathSilentBackend(t *testing.T) {
	for _, tc := range []struct {
		name    string
		backend string // startBackend kind
		proto   string // route backend_protocol
		h2      bool   // client speaks HTTP/2
	}{
		{"http1 client", beHTTP1, "http1", false},
		{"h2 client, http1 backend", beHTTP1, "http1", true},
		{"http1 client, h2c backend", beH2C, "h2c", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			var running atomic.Int32
			be := startBackend(t, pki, tc.backend, false, silentMidBody(&running))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.proto, IdleTimeout: idleTestTimeout})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, tc.h2, "")
			res, err := c.Get("https://" + frontName + "/")
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			br := bufio.NewReader(res.Body)
			if line, err := br.ReadString('\n'); line != "partial\n" {
				t.Fatalf("first line %q, %v", line, err)
			}
			rest := make(chan error, 1)
			go func() {
				_, err := io.ReadAll(br)
				rest <- err
			}()
			testnet.WaitFor(t, "the silent response to be cut (backend handler to end)", func() bool {
				// An HTTP/1.1 backend connection that carried a cut
				// response cannot be reused; an HTTP/2 one stays.
				return running.Load() == 0 && (tc.backend == beH2C || be.open.Load() == 0)
			})
			if err := recv(t, rest, "the client's body read to end"); err == nil {
				t.Fatal("the cut response reached the client as complete")
			}
		})
	}
}

// upgradeBackend answers every request with 101 Switching Protocols and
// then runs tunnel on the raw connection; running counts the tunnels
// still open.
func upgradeBackend(t *testing.T, pki *testPKI, running *atomic.Int32, tunnel func(c net.Conn)) *testBackend {
	return startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		running.Add(1)
		defer running.Add(-1)
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n")
		if brw.Flush() != nil {
			return
		}
		tunnel(c)
	}))
}

// dialUpgrade opens an upgraded connection through the proxy at addr.
func dialUpgrade(t *testing.T, pki *testPKI, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pki.pool, ServerName: frontName, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "GET /tunnel HTTP/1.1\r\nHost: "+frontName+"\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", res.StatusCode)
	}
	return c, br
}

// An upgraded connection (WebSocket) on which neither side sends anything
// for idle_timeout is closed, and with it the backend connection.
func TestGeneralPathSilentUpgrade(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	var running atomic.Int32
	be := upgradeBackend(t, pki, &running, func(c net.Conn) {
		c.Read(make([]byte, 1)) // nothing comes; returns once the proxy closes
	})
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", IdleTimeout: idleTestTimeout})
	addr := startProxy(t, h, false).addr
	_, br := dialUpgrade(t, pki, addr)
	read := make(chan error, 1)
	go func() {
		_, err := br.ReadByte()
		read <- err
	}()
	testnet.WaitFor(t, "the silent tunnel's backend side to be closed", func() bool { return running.Load() == 0 })
	if err := recv(t, read, "the client side to be closed"); err == nil {
		t.Fatal("the client read a byte nobody sent")
	}
}

// Traffic that keeps moving, however slowly and however long, is never
// cut: a response that trickles (server-sent events), an upload that
// moves while the response is silent, and a tunnel on which only one side
// speaks at a time. And the bound must not cost the backend pool its
// connections: one that sat idle for several idle timeouts is reused.
func TestGeneralPathSlowTrafficKeepsMoving(t *testing.T) {
	events := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := range idleTestTicks {
			fmt.Fprintf(w, "data: %d\n\n", i)
			if rc.Flush() != nil {
				return
			}
			time.Sleep(idleTestTick)
		}
	})
	for _, tc := range []struct {
		name    string
		backend string
		proto   string
		h2      bool
	}{
		{"http1 client", beHTTP1, "http1", false},
		{"h2 client, http1 backend", beHTTP1, "http1", true},
		{"http1 client, h2c backend", beH2C, "h2c", false},
	} {
		t.Run("events/"+tc.name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := startBackend(t, pki, tc.backend, false, events)
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.proto, IdleTimeout: idleTestTimeout})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, tc.h2, "")
			code, body := getStatus(t, c, "https://"+frontName+"/")
			if code != http.StatusOK || strings.Count(body, "data: ") != idleTestTicks {
				t.Fatalf("status %d, body %q", code, body)
			}
		})
	}

	t.Run("upload while the response is silent", func(t *testing.T) {
		for _, kind := range []string{beHTTP1, beH2C} {
			t.Run(kind, func(t *testing.T) {
				checkLeaks(t)
				pki := newTestPKI(t)
				be := startBackend(t, pki, kind, false, startsThenCounts())
				h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: kind, IdleTimeout: idleTestTimeout})
				addr := startProxy(t, h, false).addr
				c, _ := newClient(t, pki, addr, false, "")
				pr, pw := io.Pipe()
				go func() {
					for range idleTestTicks {
						if _, err := pw.Write([]byte("x")); err != nil {
							return
						}
						time.Sleep(idleTestTick)
					}
					pw.Close()
				}()
				res, err := c.Post("https://"+frontName+"/", "application/octet-stream", pr)
				if err != nil {
					t.Fatal(err)
				}
				body, err := io.ReadAll(res.Body)
				res.Body.Close()
				pr.Close()
				if want := fmt.Sprintf("started\ngot %d bytes, err <nil>\n", idleTestTicks); err != nil || string(body) != want {
					t.Fatalf("body %q, %v; want %q", body, err, want)
				}
			})
		}
	})

	t.Run("tunnel, one side at a time", func(t *testing.T) {
		checkLeaks(t)
		pki := newTestPKI(t)
		var running atomic.Int32
		be := upgradeBackend(t, pki, &running, func(c net.Conn) {
			// First the client speaks and the backend only listens...
			if _, err := io.ReadFull(c, make([]byte, idleTestTicks)); err != nil {
				return
			}
			// ...then the other way round.
			for range idleTestTicks {
				if _, err := c.Write([]byte("y")); err != nil {
					return
				}
				time.Sleep(idleTestTick)
			}
		})
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", IdleTimeout: idleTestTimeout})
		addr := startProxy(t, h, false).addr
		c, br := dialUpgrade(t, pki, addr)
		for range idleTestTicks {
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(idleTestTick)
		}
		got, err := io.ReadAll(br)
		if string(got) != strings.Repeat("y", idleTestTicks) {
			t.Fatalf("read %q, %v", got, err)
		}
		testnet.WaitFor(t, "the backend tunnel to end", func() bool { return running.Load() == 0 })
	})

	t.Run("idle pooled connection reused", func(t *testing.T) {
		checkLeaks(t)
		pki := newTestPKI(t)
		be := startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, r.RemoteAddr)
		}))
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", IdleTimeout: idleTestTimeout})
		addr := startProxy(t, h, false).addr
		c, _ := newClient(t, pki, addr, false, "")
		_, first := getStatus(t, c, "https://"+frontName+"/")
		// Longer than the idle timeout, far shorter than the pool's own
		// idle limit (backendIdleTimeout).
		time.Sleep(3 * idleTestTimeout)
		if _, second := getStatus(t, c, "https://"+frontName+"/"); second != first {
			t.Fatalf("second request came from %s, the first from %s: the pooled connection was lost", second, first)
		}
	})
}

// On the general path, a client that stops sending its request body, or
// (HTTP/2) answers pings but never opens its flow-control window for the
// response, must not hold its connection, the handler and the backend
// request for ever: a body read or a response write that waited on it
// for idle_timeout closes the connection (README: "a relay silent in both
// directions this long is closed").
func TestGeneralPathStalledClient(t *testing.T) {
	// readingBackend reads the whole body before it answers.
	readingBackend := func(running *atomic.Int32) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			running.Add(1)
			defer running.Add(-1)
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "read %d\n", n)
		})
	}
	// answeringBackend answers without reading the body.
	answeringBackend := func(size int) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Write(make([]byte, size))
		})
	}
	for _, tc := range []struct {
		name    string
		backend string // startBackend kind
		proto   string // route backend_protocol
		handler func(running *atomic.Int32) http.Handler
	}{
		{"http1 backend reading the body", beHTTP1, "http1", readingBackend},
		{"http1 backend answering first", beHTTP1, "http1", func(*atomic.Int32) http.Handler { return answeringBackend(3) }},
		{"h2c backend answering first", beH2C, "h2c", func(*atomic.Int32) http.Handler { return answeringBackend(3) }},
	} {
		t.Run("http1 client stops its body, "+tc.name, func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			var running atomic.Int32
			be := startBackend(t, pki, tc.backend, false, tc.handler(&running))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tc.proto, IdleTimeout: idleTestTimeout})
			addr := startProxy(t, h, false).addr
			c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pki.pool, ServerName: frontName, NextProtos: []string{"http/1.1"}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			io.WriteString(c, "POST / HTTP/1.1\r\nHost: "+frontName+"\r\nContent-Length: 1000\r\n\r\n"+strings.Repeat("b", 10))
			closed := make(chan error, 1)
			go func() {
				_, err := io.Copy(io.Discard, c)
				closed <- err
			}()
			recv(t, closed, "the stalled client's connection to be closed")
			testnet.WaitFor(t, "the backend handler to end", func() bool { return running.Load() == 0 })
		})
	}

	// 64 KiB is more than the server buffers, 3 bytes stay in its
	// buffer until the handler has returned.
	for _, size := range []int{64 << 10, 3} {
		t.Run(fmt.Sprintf("h2 client keeps its window shut, %d-byte response", size), func(t *testing.T) {
			checkLeaks(t)
			pki := newTestPKI(t)
			be := startBackend(t, pki, beHTTP1, false, answeringBackend(size))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", IdleTimeout: idleTestTimeout})
			p := dialRaw(t, pki, startProxy(t, h, false).addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
			p.get(1, "/")
			closed := make(chan error, 1)
			go func() {
				// step answers the server's pings: the client is alive.
				for {
					if err := p.step(); err != nil {
						closed <- err
						return
					}
				}
			}()
			if err := recv(t, closed, "the stalled client's connection to be closed"); errors.Is(err, errNoFrame) {
				t.Fatalf("the connection stayed open without a frame: %v", err)
			}
		})
	}
}
