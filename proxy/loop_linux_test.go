package proxy

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/portcullis/portcullis/testnet"
)

// TestIdleRelaysHoldNoGoroutines: relays that have exchanged a few
// small messages wait in the event loops, not in two goroutines each.
func TestIdleRelaysHoldNoGoroutines(t *testing.T) {
	const n = 200
	hello := clientHelloBytes(t, &tls.Config{ServerName: "idle.test"})
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("idle.test", echoBackend(t, hello)))
	before := runtime.NumGoroutine()
	conns := make([]net.Conn, n)
	for i := range conns {
		c, err := dialEcho(h.addr("l"), hello, fmt.Sprintf("conn-%04d", i))
		if c != nil {
			defer c.Close()
		}
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	testnet.WaitFor(t, "all active", func() bool { return h.srv.Status()[0].Active == n })
	// The backend keeps a goroutine per connection; the proxy should
	// add only its loops and the odd connection still winding down.
	if grown := runtime.NumGoroutine() - before; grown > n+n/4 {
		t.Fatalf("%d idle relays added %d goroutines; the backend accounts for %d", n, grown, n)
	}
	for _, c := range conns {
		c.Close()
	}
	testnet.WaitFor(t, "all closed", func() bool { return h.srv.Status()[0].Active == 0 })
}

// TestLoopWaitsForSlowReader: small messages to a client that does not
// read yet fill the sockets' buffers, the loop's write says EAGAIN and
// the rest waits in the loop until the client makes room. Every byte
// must arrive once and in order, and the relay must then end normally.
func TestLoopWaitsForSlowReader(t *testing.T) {
	client, proxyClient := tcpPair(t)
	proxyBackend, backend := tcpPair(t)
	proxyClient.SetWriteBuffer(4096)
	client.SetReadBuffer(4096)

	var ls eventLoops
	defer ls.stop()
	results := make(chan relayResult, 1)
	finish := func(r relayResult) {
		proxyClient.Close()
		proxyBackend.Close()
		results <- r
	}
	if !ls.pick().adopt(testSockets(proxyClient), proxyClient, proxyBackend, 0, prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}), finish) {
		t.Fatal("the loop refused the relay")
	}

	want := randomBytes(128 * 512)
	go func() {
		// One message at a time, so the loop reads each on its own
		// rather than a burst that would send the relay to goroutines
		// before the client's buffers fill.
		for p := want; len(p) > 0; p = p[512:] {
			if _, err := backend.Write(p[:512]); err != nil {
				return
			}
			time.Sleep(time.Millisecond)
		}
		backend.CloseWrite()
	}()
	time.Sleep(100 * time.Millisecond) // let the buffers toward the client fill
	client.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatalf("after %d bytes: %v", len(got), err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("received %d bytes, not the %d sent in order", len(got), len(want))
	}
	client.CloseWrite()
	select {
	case r := <-results:
		if r.end != "done" || r.toClient != int64(len(want)) || r.toBackend != 0 {
			t.Fatalf("relay ended %q with %d bytes to the client, %d to the backend", r.end, r.toClient, r.toBackend)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("relay did not end after both sides closed")
	}
}

// TestLoopRelayCut: a hard shutdown closes a relay's sockets, which
// brings its loop no event; the relay must end all the same, as
// "closed", whether the cut came before the relay reached its loop or
// after.
func TestLoopRelayCut(t *testing.T) {
	for _, before := range []bool{true, false} {
		t.Run(fmt.Sprintf("before=%v", before), func(t *testing.T) {
			_, proxyClient := tcpPair(t)
			proxyBackend, _ := tcpPair(t)
			socks := testSockets(proxyClient)
			socks.setBackend(proxyBackend)
			var ls eventLoops
			defer ls.stop()
			ls.pick() // the loops run before the cut, as in a running server

			results := make(chan relayResult, 1)
			if before {
				socks.close()
			}
			ls.relay(socks, proxyClient, proxyBackend, 0, prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}), func(r relayResult) { results <- r })
			if !before {
				socks.close()
			}
			select {
			case r := <-results:
				if r.end != "closed" {
					t.Fatalf("relay ended %q, want closed", r.end)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("relay of closed sockets never ended")
			}
		})
	}
}

// TestLoopIdleQueues: relays with different idle timeouts share a loop,
// each timeout with a queue of its own. A silent relay is closed by its
// own timeout and not by another's; a queue left empty goes when its
// timer next fires, and comes back with the next relay.
func TestLoopIdleQueues(t *testing.T) {
	var ls eventLoops
	defer ls.stop()
	l := ls.pick()
	noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	start := func(idle time.Duration) (<-chan relayResult, func()) {
		_, proxyClient := tcpPair(t)
		proxyBackend, _ := tcpPair(t)
		results := make(chan relayResult, 1)
		finish := func(r relayResult) { results <- r }
		if !l.adopt(testSockets(proxyClient), proxyClient, proxyBackend, idle, noPipe, finish) {
			t.Fatal("the loop refused the relay")
		}
		return results, func() { proxyClient.Close(); proxyBackend.Close() }
	}
	waitEnd := func(results <-chan relayResult, want string) {
		t.Helper()
		select {
		case r := <-results:
			if r.end != want {
				t.Fatalf("relay ended %q, want %q", r.end, want)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("relay did not end (%s)", want)
		}
	}

	long, closeLong := start(time.Hour)
	short, _ := start(200 * time.Millisecond)
	waitEnd(short, "idle_timeout")
	again, _ := start(200 * time.Millisecond) // its queue went with the first
	waitEnd(again, "idle_timeout")
	select {
	case r := <-long:
		t.Fatalf("relay with an hour's idle_timeout ended %q", r.end)
	default:
	}
	closeLong()
	var cut []*loopConn
	l.mu.Lock()
	for _, c := range l.conns {
		cut = append(cut, c)
	}
	l.mu.Unlock()
	for _, c := range cut {
		c.cut() // closed sockets bring no event; the hard shutdown's path
	}
	waitEnd(long, "closed")
	// The hour's queue would fire in 15 minutes: fire it now.
	l.mu.Lock()
	var left []*idleQueue
	for _, q := range l.idleQs {
		left = append(left, q)
	}
	l.mu.Unlock()
	for _, q := range left {
		q.fire()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if n := len(l.idleQs); n != 0 {
		t.Fatalf("%d idle queues left with no relay after their timers fired", n)
	}
}

// TestLoopIdleCountsFromLastActivity: a relay that moved bytes and then
// went quiet is closed by the fourth check in a row that finds it quiet
// (a quarter of idle_timeout apart), not one check later. The test runs
// the checks itself, on an hour's timeout whose timer never fires.
func TestLoopIdleCountsFromLastActivity(t *testing.T) {
	var ls eventLoops
	defer ls.stop()
	l := ls.pick()
	client, proxyClient := tcpPair(t)
	proxyBackend, backend := tcpPair(t)
	noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	if !l.adopt(testSockets(proxyClient), proxyClient, proxyBackend, time.Hour, noPipe, func(relayResult) {}) {
		t.Fatal("the loop refused the relay")
	}
	// check runs the relay's idle check now and reports whether it
	// closed the relay.
	check := func() bool {
		l.mu.Lock()
		var q *idleQueue
		for _, c := range l.conns {
			c.due, q = 0, c.idleQ
		}
		l.mu.Unlock()
		if q == nil {
			t.Fatal("no relay in the loop")
		}
		q.fire()
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.conns) == 0
	}

	check() // takes the counters of the connections' setup
	client.SetDeadline(time.Now().Add(time.Minute))
	backend.SetDeadline(time.Now().Add(time.Minute))
	for _, msg := range []string{"ping", "pong"} {
		from, to := net.Conn(client), net.Conn(backend)
		if msg == "pong" {
			from, to = backend, client
		}
		if _, err := from.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(to, make([]byte, len(msg))); err != nil {
			t.Fatal(err)
		}
	}
	// Both writes acknowledged: the counters hold still from here.
	testnet.WaitFor(t, "the relay's writes acknowledged", func() bool {
		return unacked(t, proxyClient) == 0 && unacked(t, proxyBackend) == 0
	})
	if check() {
		t.Fatal("closed by the check that saw bytes move")
	}
	for i := 1; i <= 4; i++ {
		closed := check()
		if closed != (i == 4) {
			t.Fatalf("quiet check %d: closed = %v; want the fourth to close the relay", i, closed)
		}
	}
}

// unacked is the number of bytes c has sent that its peer has not
// acknowledged.
func unacked(t *testing.T, c *net.TCPConn) uint32 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	rc.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err != nil {
		t.Fatal(err)
	}
	return info.Unacked
}

// TestLoopIdleTimeoutUnderFourNanoseconds: config accepts any positive
// idle_timeout, and one under 4ns has a quarter period of zero. A
// silent relay must still be closed by it, as the goroutine relay
// closes it, rather than be checked again and again without its quiet
// time ever growing.
func TestLoopIdleTimeoutUnderFourNanoseconds(t *testing.T) {
	var ls eventLoops
	defer ls.stop()
	l := ls.pick()
	noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	_, proxyClient := tcpPair(t)
	proxyBackend, _ := tcpPair(t)
	results := make(chan relayResult, 1)
	if !l.adopt(testSockets(proxyClient), proxyClient, proxyBackend, 3*time.Nanosecond, noPipe, func(r relayResult) { results <- r }) {
		t.Fatal("the loop refused the relay")
	}
	select {
	case r := <-results:
		if r.end != "idle_timeout" {
			t.Fatalf("relay ended %q, want idle_timeout", r.end)
		}
	case <-time.After(30 * time.Second):
		l.mu.Lock()
		for _, c := range l.conns {
			defer c.cut()
		}
		l.mu.Unlock()
		t.Fatal("a silent relay with a 3ns idle_timeout was never closed")
	}
}

// TestLoopsThatCannotStart: with one descriptor left, the first loop's
// epoll instance can be made and the second's cannot. The loops made
// so far are discarded (their goroutines were never started), the
// failure is reported once, and relays run in goroutines without
// hanging the connection that asked. Once descriptors are free again,
// the next relay starts the loops.
//
// It runs in a process of its own (this test binary, run again): in
// the one running the other tests, a socket an earlier test's goroutine
// closes late leaves room for the second epoll instance.
func TestLoopsThatCannotStart(t *testing.T) {
	const child = "PORTCULLIS_TEST_LOOPS_CANNOT_START"
	if os.Getenv(child) == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestLoopsThatCannotStart$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), child+"=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return
	}
	// The runtime's poller makes descriptors of its own the first time
	// it is needed; have it made before they run out.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	var ls eventLoops
	defer ls.stop()
	var warned []error
	ls.warn = func(err error) { warned = append(warned, err) }
	t.Run("out of descriptors", func(t *testing.T) {
		spare, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		exhaustDescriptors(t)
		syscall.Close(spare) // room for exactly one epoll instance

		for range 2 {
			picked := make(chan *eventLoop, 1)
			go func() { picked <- ls.pick() }()
			select {
			case l := <-picked:
				if l != nil {
					t.Fatal("a loop was picked though not all of them could start")
				}
			case <-time.After(30 * time.Second):
				t.Fatal("pick hung discarding the loops it had made")
			}
		}
		if len(warned) != 1 {
			t.Fatalf("warned %d times (%v), want once", len(warned), warned)
		}
	})
	if ls.pick() == nil {
		t.Fatal("the loops did not start once descriptors were free")
	}
	stopped := make(chan struct{})
	go func() { ls.stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("stop hung")
	}
}

// TestLoopReadsPastUrgentMark: a read stops short at TCP's urgent mark
// with more data queued behind it, so a short read does not always mean
// the socket is drained, and no new edge comes for what is left. The
// goroutine relay reads on and delivers the stream (without the
// out-of-band byte); so must the loop.
func TestLoopReadsPastUrgentMark(t *testing.T) {
	client, proxyClient := tcpPair(t)
	proxyBackend, backend := tcpPair(t)
	rc, err := client.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		err = syscall.Sendto(int(fd), []byte("abc"), syscall.MSG_OOB, nil) // 'c' is urgent
	})
	if err != nil {
		t.Fatal(err)
	}
	client.Write([]byte("def"))
	// All of it queued at the proxy before the loop's first read (the
	// acknowledged count includes the SYN).
	testnet.WaitFor(t, "the bytes acknowledged", func() bool { return bytesMoved(client) >= 7 })

	var ls eventLoops
	defer ls.stop()
	finish := func(relayResult) { proxyClient.Close(); proxyBackend.Close() }
	if !ls.pick().adopt(testSockets(proxyClient), proxyClient, proxyBackend, 0, prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}), finish) {
		t.Fatal("the loop refused the relay")
	}
	backend.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, 5)
	if n, err := io.ReadFull(backend, got); err != nil {
		t.Fatalf("backend received %q: %v; want the stream past the urgent mark", got[:n], err)
	}
	if string(got) != "abdef" {
		t.Fatalf("backend received %q, want %q", got, "abdef")
	}
}

// TestLoopRelaysWhileAFinishBlocks: what a relay leaves to do when it
// ends (its access log line, above all) may block, on a log pipe nobody
// reads. The other relays of its loop must keep moving meanwhile.
func TestLoopRelaysWhileAFinishBlocks(t *testing.T) {
	var ls eventLoops
	defer ls.stop()
	l := ls.pick()
	noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	relay := func(finish func(relayResult)) (client, backend *net.TCPConn) {
		client, proxyClient := tcpPair(t)
		proxyBackend, backend := tcpPair(t)
		if !l.adopt(testSockets(proxyClient), proxyClient, proxyBackend, 0, noPipe, finish) {
			t.Fatal("the loop refused the relay")
		}
		return client, backend
	}
	blocked, unblock := make(chan struct{}), make(chan struct{})
	defer close(unblock)
	endingClient, endingBackend := relay(func(relayResult) { close(blocked); <-unblock })
	otherClient, otherBackend := relay(func(relayResult) {})

	endingClient.Close()
	endingBackend.Close()
	select {
	case <-blocked:
	case <-time.After(30 * time.Second):
		t.Fatal("the ending relay never finished")
	}
	otherClient.Write([]byte("still moving"))
	otherBackend.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len("still moving"))
	if _, err := io.ReadFull(otherBackend, got); err != nil {
		t.Fatalf("the loop's other relay stopped while a finish blocked: %v", err)
	}
	// Bulk data moves the relay to goroutines; that must not wait
	// behind the blocked finish either.
	bulk := randomBytes(1 << 20)
	go otherClient.Write(bulk)
	got = make([]byte, len(bulk))
	if _, err := io.ReadFull(otherBackend, got); err != nil || !bytes.Equal(got, bulk) {
		t.Fatalf("bulk data through the loop's other relay while a finish blocked: %v", err)
	}
	otherClient.Close()
	otherBackend.Close()
}

// testSockets registers client as sockets do for a connection served
// through net.
func testSockets(client *net.TCPConn) *sockets {
	s := &sockets{}
	s.setClient(client)
	return s
}

// TestLoopIdleQueueOutlivesItsRelays: short relays one after another
// share their loop's queue: it is not dropped and made again (with a
// new timer) each time it empties, only once its timer finds it empty.
func TestLoopIdleQueueOutlivesItsRelays(t *testing.T) {
	var ls eventLoops
	defer ls.stop()
	l := ls.pick()
	noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "x"})
	queueOf := func() *idleQueue {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.idleQs[time.Hour]
	}
	var first *idleQueue
	for i := range 3 {
		client, proxyClient := tcpPair(t)
		proxyBackend, backend := tcpPair(t)
		done := make(chan relayResult, 1)
		if !l.adopt(testSockets(proxyClient), proxyClient, proxyBackend, time.Hour, noPipe, func(r relayResult) { done <- r }) {
			t.Fatal("the loop refused the relay")
		}
		if i == 0 {
			first = queueOf()
		} else if q := queueOf(); q != first {
			t.Fatalf("relay %d got a new queue (%p, first %p)", i, q, first)
		}
		client.Close()
		backend.Close()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("relay did not end")
		}
	}
	first.fire() // as its timer would, a quarter hour on
	if q := queueOf(); q != nil {
		t.Fatal("the empty queue outlived its timer's firing")
	}
}
