package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

func TestRoutingBySNI(t *testing.T) {
	ca := testpki.NewCA(t)
	a := newTLSBackend(t, ca, "A", "a.test")
	b := newTLSBackend(t, ca, "B", "b.test")
	w := newTLSBackend(t, ca, "W", "x.w.test")
	d := newTLSBackend(t, ca, "D", "y.x.w.test", "w.test", "other.test", "127.0.0.1")
	h := startProxy(t, `
[[listener]]
name = "public"
listen = "127.0.0.1:0"
`+routeTOML("a.test", a.addr())+routeTOML("B.Test.", b.addr())+routeTOML("*.w.test", w.addr())+routeTOML("*", d.addr()))
	addr := h.addr("public")

	for _, tc := range []struct{ sni, want string }{
		{"a.test", "A"},
		{"b.test", "B"}, // configured as "B.Test." — normalised
		{"x.w.test", "W"},
		{"y.x.w.test", "D"}, // a wildcard covers one label only
		{"w.test", "D"},     // nor the bare parent
		{"other.test", "D"},
		{"127.0.0.1", "D"}, // crypto/tls sends no SNI for an IP
	} {
		t.Run(tc.sni, func(t *testing.T) {
			c, got := dialTLS(t, addr, tc.sni, ca)
			defer c.Close()
			if got != tc.want {
				t.Fatalf("routed to %q, want %q", got, tc.want)
			}
			// The relay is a real TLS session end to end.
			io.WriteString(c, "ping")
			buf := make([]byte, 4)
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
				t.Fatalf("echo: %q %v", buf, err)
			}
		})
	}
}

// matchBackend reads exactly len(want) bytes and answers "match" or
// "mismatch", then echoes.
func matchBackend(t *testing.T, want []byte) string {
	return rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		got := make([]byte, len(want))
		if _, err := io.ReadFull(c, got); err != nil {
			return
		}
		if bytes.Equal(got, want) {
			io.WriteString(c, "match\n")
		} else {
			io.WriteString(c, "mismatch\n")
		}
		io.Copy(c, c)
	})
}

func TestClientHelloShapes(t *testing.T) {
	small := clientHelloBytes(t, &tls.Config{ServerName: "shape.test"})
	var protos []string
	for i := 0; i < 60; i++ {
		protos = append(protos, fmt.Sprintf("proto-%02d-padding-padding", i))
	}
	large := clientHelloBytes(t, &tls.Config{ServerName: "shape.test", NextProtos: protos})
	if len(large) <= 1500 {
		t.Fatalf("large ClientHello is only %d bytes", len(large))
	}
	twoRecords := splitRecord(small, 40)

	for _, tc := range []struct {
		name  string
		bytes []byte
		write func(c net.Conn, b []byte) error
	}{
		{"whole", small, writeAll},
		{"byte by byte", small, writeBytewise},
		{"two records", twoRecords, writeAll},
		{"two records byte by byte", twoRecords, writeBytewise},
		{"over 1500 bytes", large, writeAll},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backend := matchBackend(t, tc.bytes)
			h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("shape.test", backend))
			c, err := net.Dial("tcp", h.addr("l"))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if err := tc.write(c, tc.bytes); err != nil {
				t.Fatal(err)
			}
			if line, err := readLine(c); line != "match" {
				t.Fatalf("backend saw %q (%v); the replayed bytes differ from what was sent", line, err)
			}
		})
	}
}

func writeAll(c net.Conn, b []byte) error { _, err := c.Write(b); return err }

func writeBytewise(c net.Conn, b []byte) error {
	c.(*net.TCPConn).SetNoDelay(true)
	for i := range b {
		if _, err := c.Write(b[i : i+1]); err != nil {
			return err
		}
		if i%64 == 0 {
			time.Sleep(time.Millisecond) // let some bytes arrive as their own segments
		}
	}
	return nil
}

func TestRejections(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "known.test"})
	unknown := clientHelloBytes(t, &tls.Config{ServerName: "unknown.test"})
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close() // nothing listens here now

	h := startProxy(t, `
[[listener]]
name = "l"
listen = "127.0.0.1:0"
handshake_timeout = "300ms"
dial_timeout = "2s"
`+routeTOML("known.test", deadAddr))
	addr := h.addr("l")

	for _, tc := range []struct {
		name, reason string
		send         []byte
	}{
		{"plain HTTP", "bad_client_hello", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
		{"five bytes", "bad_client_hello", []byte{0x16, 3, 1, 0, 0}},
		{"truncated record", "bad_client_hello", hello[:20]},
		{"silent client", "handshake_timeout", nil},
		{"no route", "no_route", unknown},
		{"unreachable backend", "backend_unreachable", hello},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := h.rejected("l", tc.reason)
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if tc.send != nil {
				c.Write(tc.send)
			}
			if tc.name == "truncated record" {
				c.(*net.TCPConn).CloseWrite()
			}
			// The proxy closes the connection; the read ends with EOF or a reset.
			if n, err := c.Read(make([]byte, 1)); err == nil {
				t.Fatalf("read %d bytes, want the connection closed", n)
			}
			testnet.WaitFor(t, tc.reason+" counted", func() bool { return h.rejected("l", tc.reason) == before+1 })
		})
	}
}

func TestHalfClose(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "hc.test"})
	t.Run("client shuts write first", func(t *testing.T) {
		backend := rawBackend(t, func(c *net.TCPConn) {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			got, _ := io.ReadAll(c) // until the client's FIN arrives
			fmt.Fprintf(c, "got %d bytes", len(got))
		})
		h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("hc.test", backend))
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(append(append([]byte{}, hello...), "payload"...))
		c.(*net.TCPConn).CloseWrite()
		reply, err := io.ReadAll(c)
		if want := fmt.Sprintf("got %d bytes", len(hello)+7); string(reply) != want || err != nil {
			t.Fatalf("reply %q (%v), want %q", reply, err, want)
		}
	})
	t.Run("backend shuts write first", func(t *testing.T) {
		backendDone := make(chan struct{})
		backend := rawBackend(t, func(c *net.TCPConn) {
			defer close(backendDone)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.ReadFull(c, make([]byte, len(hello)))
			io.WriteString(c, "early reply")
			c.CloseWrite()
			rest, _ := io.ReadAll(c)
			if string(rest) != "late request" {
				t.Errorf("backend got %q after its half-close", rest)
			}
		})
		h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("hc.test", backend))
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(hello)
		reply, err := io.ReadAll(c) // EOF from the backend's half-close
		if string(reply) != "early reply" || err != nil {
			t.Fatalf("reply %q (%v)", reply, err)
		}
		io.WriteString(c, "late request")
		c.(*net.TCPConn).CloseWrite()
		<-backendDone // the backend has checked what arrived after its half-close
	})
}

func TestLargeTransferIntact(t *testing.T) {
	const size = 64 << 20
	hello := clientHelloBytes(t, &tls.Config{ServerName: "bulk.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(c, c) // echo everything back
		c.CloseWrite()
	})
	h, c := activeRelay(t, hello, "bulk.test", backend)
	c.SetDeadline(time.Now().Add(2 * time.Minute))

	sent := sha256.New()
	go func() {
		rng := rand.NewChaCha8([32]byte{7})
		buf := make([]byte, 256<<10)
		for n := 0; n < size; n += len(buf) {
			rng.Read(buf)
			sent.Write(buf)
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
		c.(*net.TCPConn).CloseWrite()
	}()
	got := sha256.New()
	n, err := io.Copy(got, c)
	if err != nil || n != size {
		t.Fatalf("read back %d bytes (%v), want %d", n, err, size)
	}
	if !bytes.Equal(got.Sum(nil), sent.Sum(nil)) {
		t.Fatal("64 MiB came back with a different SHA-256")
	}
	testnet.WaitFor(t, "byte counters", func() bool {
		return h.routeBytes("l", "bulk.test", "backend_to_client") == size
	})
	if v := h.routeBytes("l", "bulk.test", "client_to_backend"); v != size+float64(len(hello)) {
		t.Fatalf("client_to_backend = %v, want %d", v, size+len(hello))
	}
}

func TestThousandConcurrentConnections(t *testing.T) {
	const n = 1000
	hello := clientHelloBytes(t, &tls.Config{ServerName: "many.test"})
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("many.test", echoBackend(t, hello)))
	addr := h.addr("l")

	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dialEcho(addr, hello, fmt.Sprintf("conn-%04d", i))
			conns[i] = c
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	testnet.WaitFor(t, "all active", func() bool { return h.srv.Status()[0].Active == n })
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	testnet.WaitFor(t, "all closed", func() bool { return h.srv.Status()[0].Active == 0 })
	// TestMain's goleak check fails the run if any relay goroutine is left.
}

// TestRelayUsesSplice guards the zero-copy path. Go's splice keeps a
// pipe per direction while it waits for data, so relays that have
// carried bulk data and then gone quiet show up as pipe descriptors; a
// relay that wrapped the sockets would copy through a user-space buffer
// and hold none. Relays that only exchanged small messages stay on
// read/write and hold no pipe either.
func TestRelayUsesSplice(t *testing.T) {
	if _, err := os.Stat("/proc/self/fd"); err != nil {
		t.Skip("needs /proc")
	}
	const n = 20
	const bulk = 1 << 20
	hello := clientHelloBytes(t, &tls.Config{ServerName: "splice.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		mode, _ := readLine(c)
		if mode == "bulk" {
			c.Write(make([]byte, bulk))
			io.ReadFull(c, make([]byte, bulk))
		}
		io.WriteString(c, "ready\n")
		io.Copy(io.Discard, c)
	})
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("splice.test", backend))
	// Earlier socket-to-socket copies in this process (the runtime's own
	// splice, behind io.Copy) leave pipes in the runtime's pool; let the
	// GC close them so the count below only sees pipes held by these
	// relays.
	settle := func() int {
		before := countPipes(t)
		for i := 0; i < 20; i++ {
			runtime.GC()
			time.Sleep(10 * time.Millisecond)
			if n := countPipes(t); n < before {
				before = n
			} else if n == 0 {
				break
			}
		}
		return before
	}
	open := func(mode string) net.Conn {
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(time.Minute))
		c.Write(append(append([]byte{}, hello...), mode+"\n"...))
		if mode == "bulk" {
			if _, err := io.ReadFull(c, make([]byte, bulk)); err != nil {
				t.Fatal(err)
			}
			c.Write(make([]byte, bulk))
		}
		if line, _ := readLine(c); line != "ready" {
			t.Fatalf("greeting %q", line)
		}
		return c
	}

	before := settle()
	for i := 0; i < n; i++ {
		open("small")
	}
	time.Sleep(50 * time.Millisecond)
	if got := countPipes(t) - before; got > 2 {
		t.Errorf("%d pipe descriptors for %d relays that only carried small messages, want none", got, n)
	}
	for i := 0; i < n; i++ {
		open("bulk")
	}
	// Each direction that carried bulk data now waits in splice holding
	// a pipe (two descriptors); demand at least one pipe per connection.
	testnet.WaitFor(t, "splice pipes", func() bool { return countPipes(t)-before >= 2*n })
}

func countPipes(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "pipe:") {
			n++
		}
	}
	return n
}

func TestIdleTimeout(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "idle.test"})
	var mu sync.Mutex
	received := map[string]int{}
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		tag, _ := readLine(c)
		n, _ := io.Copy(io.Discard, c)
		mu.Lock()
		received[tag] = int(n)
		mu.Unlock()
	})
	h := startProxy(t, `
[[listener]]
name = "l"
listen = "127.0.0.1:0"
idle_timeout = "400ms"
`+routeTOML("idle.test", backend))

	t.Run("silent relay is closed", func(t *testing.T) {
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(append(append([]byte{}, hello...), "silent\n"...))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("read data, want close")
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatal("relay was not closed by idle_timeout")
		}
	})
	t.Run("silent after bulk (spliced) is closed", func(t *testing.T) {
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(append(append([]byte{}, hello...), "bulk\n"...))
		// Full chunks switch the client-to-backend direction to splice;
		// its idle check must work the same way there.
		if _, err := c.Write(make([]byte, 1<<20)); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("read data, want close")
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatal("spliced relay was not closed by idle_timeout")
		}
		testnet.WaitFor(t, "backend result", func() bool { mu.Lock(); defer mu.Unlock(); _, ok := received["bulk"]; return ok })
		mu.Lock()
		defer mu.Unlock()
		if received["bulk"] != 1<<20 {
			t.Fatalf("backend received %d bytes, want all %d before the idle close", received["bulk"], 1<<20)
		}
	})
	t.Run("one-way traffic keeps it open", func(t *testing.T) {
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(append(append([]byte{}, hello...), "busy\n"...))
		// Three idle periods of upload while the download side is
		// silent: activity in either direction counts.
		for i := 0; i < 15; i++ {
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatalf("write %d: %v", i, err)
			}
			time.Sleep(80 * time.Millisecond)
		}
		c.(*net.TCPConn).CloseWrite()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.Copy(io.Discard, c)
		testnet.WaitFor(t, "backend result", func() bool { mu.Lock(); defer mu.Unlock(); _, ok := received["busy"]; return ok })
		mu.Lock()
		defer mu.Unlock()
		if received["busy"] != 15 {
			t.Fatalf("backend received %d bytes, want 15: the relay was cut while active", received["busy"])
		}
	})
}

// TestIdleTimeoutStalledReader: a client that half-closes its side and
// then reads nothing leaves the relay with one direction done and the
// other blocked writing to it. No byte moves either way, so idle_timeout
// must close the relay as it would any other silent one; the backend's
// write then fails.
func TestIdleTimeoutStalledReader(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "stall.test"})
	wrote := make(chan error, 1)
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(io.Discard, c) // until the client's half-close
		// Far more than every buffer between here and the client holds.
		_, err := c.Write(make([]byte, 64<<20))
		wrote <- err
	})
	_, c := activeRelay(t, hello, "stall.test", backend, `idle_timeout = "400ms"`)
	c.(*net.TCPConn).CloseWrite()
	select {
	case err := <-wrote:
		if err == nil {
			t.Fatal("the backend wrote 64 MiB to a client that reads nothing")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a relay blocked on a client that stopped reading was not closed by idle_timeout")
	}
}

// TestIdleTimeoutSlowReader: a client that reads a download slowly,
// pausing longer than the idle check's period but well under
// idle_timeout each time, keeps a relay whose writes to it time out
// again and again; every byte arrives.
func TestIdleTimeoutSlowReader(t *testing.T) {
	const size = 1 << 20
	hello := clientHelloBytes(t, &tls.Config{ServerName: "slow.test"})
	data := randomBytes(size)
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		c.Write(data)
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
	_, c := activeRelay(t, hello, "slow.test", backend, `idle_timeout = "1s"`)
	c.(*net.TCPConn).SetReadBuffer(32 << 10)
	var got []byte
	buf := make([]byte, 128<<10)
	for {
		time.Sleep(300 * time.Millisecond) // the check runs every 250 ms
		n, err := io.ReadFull(c, buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, want all %d intact: the relay was cut while the client was reading", len(got), size)
	}
}

func TestMaxConnections(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "cap.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		io.WriteString(c, "hi\n")
		io.Copy(io.Discard, c)
	})
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\n"+routeTOML("cap.test", backend))
	open := func() (net.Conn, error) {
		c, err := net.Dial("tcp", h.addr("l"))
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(hello)
		if line, err := readLine(c); line != "hi" {
			c.Close()
			return nil, fmt.Errorf("no greeting: %v", err)
		}
		return c, nil
	}
	c1, err := open()
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	c2, err := open()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := open(); err == nil {
		t.Fatal("third connection got through a cap of 2")
	}
	testnet.WaitFor(t, "rejection counted", func() bool { return h.rejected("l", "max_connections") == 1 })
	c2.Close()
	testnet.WaitFor(t, "slot freed", func() bool { return h.srv.Status()[0].Active == 1 })
	c3, err := open()
	if err != nil {
		t.Fatalf("after closing one, a new connection was refused: %v", err)
	}
	c3.Close()
}

func TestShutdownDrains(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "drain.test"})
	release := make(chan struct{})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		<-release
		io.WriteString(c, "finished\n")
	})
	h, c := activeRelay(t, hello, "drain.test", backend)
	addr := h.addr("l")
	c.SetDeadline(time.Now().Add(20 * time.Second))

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		done <- h.srv.Shutdown(ctx)
	}()
	// New connections are refused once the listener is closed…
	testnet.WaitFor(t, "listener closed", func() bool {
		nc, err := net.Dial("tcp", addr)
		if err == nil {
			nc.Close()
		}
		return err != nil
	})
	// …while the live one finishes normally.
	close(release)
	if line, err := readLine(c); line != "finished" {
		t.Fatalf("live connection cut during drain: %q %v", line, err)
	}
	c.Close() // the client's half ends the relay
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// activeRelay starts a proxy with one listener "l" routing sni to
// backend, sends hello through it and waits until the connection counts
// as active. listenerKeys are extra lines for the listener's table, such
// as `idle_timeout = "1s"`. The connection has a one-minute deadline and
// is closed when the test ends.
func activeRelay(t *testing.T, hello []byte, sni, backend string, listenerKeys ...string) (*harness, net.Conn) {
	t.Helper()
	toml := "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"
	for _, k := range listenerKeys {
		toml += k + "\n"
	}
	h := startProxy(t, toml+routeTOML(sni, backend))
	c, err := net.Dial("tcp", h.addr("l"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	c.Write(hello)
	testnet.WaitFor(t, "active", func() bool { return h.srv.Status()[0].Active == 1 })
	return h, c
}

func TestShutdownGraceExpires(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "stuck.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.Copy(io.Discard, c)
	})
	h, c := activeRelay(t, hello, "stuck.test", backend)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var cut *CutError
	if err := h.srv.Shutdown(ctx); !errors.As(err, &cut) || !errors.Is(err, context.DeadlineExceeded) || cut.Connections != 1 {
		t.Fatalf("Shutdown = %v, want a CutError for 1 connection wrapping DeadlineExceeded", err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after the grace period")
	}
}

// TestShutdownWithoutConnections: a grace period that is already over
// (shutdown_grace = "0s") with no connection live cuts nothing, and
// Shutdown must not report that it did (serve would log "grace period
// over: closed remaining connections").
func TestShutdownWithoutConnections(t *testing.T) {
	for i := range 20 {
		h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("idle.test", "127.0.0.1:1"))
		if err := h.srv.Shutdown(canceledCtx()); err != nil {
			t.Fatalf("shutdown %d: Shutdown = %v with no connection to cut, want nil", i, err)
		}
	}
}

// TestShutdownGraceClosesBlockedRelay: a relay stuck writing to a
// backend that stopped reading is not woken by the client's socket
// closing; the end of the grace period must close the backend socket
// too, so the relay ends and Shutdown returns.
func TestShutdownGraceClosesBlockedRelay(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "full.test"})
	release := make(chan struct{})
	backend := rawBackend(t, func(c *net.TCPConn) {
		<-release // never reads
	})
	defer close(release)
	h, c := activeRelay(t, hello, "full.test", backend)
	// Fill the backend's receive queue, the relay's pipe and the
	// client's send queue, until writes stall.
	c.(*net.TCPConn).SetWriteBuffer(64 << 10)
	chunk := make([]byte, 256<<10)
	for {
		c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := c.Write(chunk); err != nil {
			break
		}
	}
	h.shutdownCutting(100*time.Millisecond, "the blocked relay")
}

// TestShutdownCutsHandshakesUncounted: connections still waiting for a
// PROXY header or a ClientHello when the grace period ends are cut and
// counted as cut (CutError), not rejected as clients that sent a bad
// header or hello: the read the cut broke says nothing of the client.
func TestShutdownCutsHandshakesUncounted(t *testing.T) {
	h := startProxy(t, `
[[listener]]
name = "plain"
listen = "127.0.0.1:0"
handshake_timeout = "1m"
`+routeTOML("*", "127.0.0.1:1")+`
[[listener]]
name = "pp"
listen = "127.0.0.2:0"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.1/32"]
handshake_timeout = "1m"
`+routeTOML("*", "127.0.0.1:1"))
	names := []string{"plain", "pp"}
	for _, name := range names {
		c, err := net.Dial("tcp", h.addr(name)) // and sends nothing
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	testnet.WaitFor(t, "both connections active", func() bool {
		st := h.srv.Status()
		return st[0].Active == 1 && st[1].Active == 1
	})
	var cut *CutError
	if err := h.srv.Shutdown(canceledCtx()); !errors.As(err, &cut) || cut.Connections != 2 {
		t.Fatalf("Shutdown = %v, want a CutError for 2 connections", err)
	}
	for _, name := range names {
		for r := reason(0); r < numReasons; r++ {
			if n := h.rejected(name, r.String()); n != 0 {
				t.Errorf("listener %s: %v connection(s) rejected as %s, want none: the shutdown cut them", name, n, r)
			}
		}
	}
}

// TestRemovedRoutesLeaveNoSeries: series of routes and listeners that a
// reload removed are no longer exported, so configuration churn does not
// grow /metrics without bound.
func TestRemovedRoutesLeaveNoSeries(t *testing.T) {
	backend := rawBackend(t, func(c *net.TCPConn) {})
	base := "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n" + routeTOML("keep.test", backend)
	h := startProxy(t, base+routeTOML("gone.test", backend)+"[[listener]]\nname = \"old\"\nlisten = \"127.0.0.2:0\"\n")
	series := func() string {
		mfs, err := h.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				fmt.Fprintln(&b, mf.GetName(), m.GetLabel())
			}
		}
		return b.String()
	}
	if s := series(); !strings.Contains(s, "gone.test") || !strings.Contains(s, `value:"old"`) {
		t.Fatalf("series missing before the reload:\n%s", s)
	}
	h.apply(base)
	s := series()
	if strings.Contains(s, "gone.test") || strings.Contains(s, `value:"old"`) {
		t.Fatalf("removed route or listener still exported:\n%s", s)
	}
	if !strings.Contains(s, "keep.test") {
		t.Fatalf("kept route lost its series:\n%s", s)
	}
}

// TestBackendAddressOrHostName: a backend written as an address is
// dialed as parsed at compile time, one written as a host name through
// the resolver; both reach the backend.
func TestBackendAddressOrHostName(t *testing.T) {
	byAddr := clientHelloBytes(t, &tls.Config{ServerName: "addr.test"})
	byName := clientHelloBytes(t, &tls.Config{ServerName: "name.test"})
	if len(byAddr) != len(byName) {
		t.Fatal("the two hellos differ in length; echoBackend reads one length")
	}
	backend := echoBackend(t, byAddr)
	_, port, err := net.SplitHostPort(backend)
	if err != nil {
		t.Fatal(err)
	}
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+
		routeTOML("addr.test", backend)+routeTOML("name.test", net.JoinHostPort("localhost", port)))
	for name, hello := range map[string][]byte{"address": byAddr, "host name": byName} {
		c, err := dialEcho(h.addr("l"), hello, name)
		if c != nil {
			c.Close()
		}
		if err != nil {
			t.Errorf("backend by %s: %v", name, err)
		}
	}
}
