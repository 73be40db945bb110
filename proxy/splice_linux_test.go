package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/portcullis/portcullis/testnet"
)

// TestSplicerMovesStreamIntact drives the splicer chunk by chunk from
// one socket to another whose reader starts late, so the pump finds the
// destination full and must wait for room; every byte must arrive once,
// in order, and the end of the source must come back as io.EOF.
func TestSplicerMovesStreamIntact(t *testing.T) {
	writer, src := tcpPair(t)
	dst, reader := tcpPair(t)
	dst.SetWriteBuffer(64 << 10)
	reader.SetReadBuffer(64 << 10)

	data := randomBytes(8 << 20)
	got := stream(writer, reader, data, 50*time.Millisecond)
	sp := newTestSplicer(t, dst, src)
	src.SetReadDeadline(time.Now().Add(time.Minute))
	dst.SetWriteDeadline(time.Now().Add(time.Minute))
	var total int64
	for {
		n, err := sp.chunk()
		total += n
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", total, err)
		}
	}
	if sp.rfd < 0 {
		t.Fatal("no pipe was used")
	}
	if size, err := unix.FcntlInt(uintptr(sp.rfd), unix.F_GETPIPE_SZ, 0); err != nil || size != maxSplice {
		t.Fatalf("the pipe holds %d bytes (%v), want %d", size, err, maxSplice)
	}
	if lowat := notSentLowat(t, dst); lowat != maxSplice {
		t.Fatalf("destination's TCP_NOTSENT_LOWAT is %d, want %d", lowat, maxSplice)
	}
	dst.CloseWrite()
	if total != int64(len(data)) {
		t.Fatalf("moved %d bytes, want %d", total, len(data))
	}
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatal("the bytes that arrived differ from those sent")
	}
	sp.close()
	if sp.rfd != -1 || sp.wfd != -1 {
		t.Fatal("close left the pipe open")
	}
}

// TestSplicerReportsDeadline: a source that stays silent ends the wait
// at its read deadline with the pipe empty, as the idle check expects.
func TestSplicerReportsDeadline(t *testing.T) {
	_, src := tcpPair(t)
	dst, _ := tcpPair(t)
	sp := newTestSplicer(t, dst, src)
	src.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	n, err := sp.chunk()
	if n != 0 || !isTimeout(err) {
		t.Fatalf("silent source: %d bytes, err %v; want 0 and a timeout", n, err)
	}
	if sp.inPipe != 0 {
		t.Fatalf("%d bytes left in the pipe", sp.inPipe)
	}
}

// TestRelayWithoutPipe: a bulk direction that cannot get a pipe, here
// because the process has no descriptor left, keeps relaying by
// read/write. Every byte arrives, the direction ends at EOF as usual
// and the missing pipe is counted once, not once per chunk.
func TestRelayWithoutPipe(t *testing.T) {
	writer, src := tcpPair(t)
	dst, reader := tcpPair(t)
	data := randomBytes(8 << 20)
	exhaustDescriptors(t)
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != syscall.EMFILE {
		t.Fatalf("pipe2 with every descriptor in use: %v, want EMFILE", err)
	}

	relayWithoutPipe(t, writer, src, dst, reader, data)
	if lowat := notSentLowat(t, dst); lowat != maxSplice {
		t.Fatalf("destination's TCP_NOTSENT_LOWAT is %d, want %d as for a spliced direction", lowat, maxSplice)
	}
}

// TestBulkRelayWithoutDescriptors: a proxy that has run out of
// descriptors keeps relaying the connections it has. Both directions of
// a connection that starts moving bulk data then cannot get a pipe; they
// copy by read/write, every byte comes back intact, and
// portcullis_relay_pipe_unavailable_total counts the two directions.
func TestBulkRelayWithoutDescriptors(t *testing.T) {
	const size = 8 << 20
	hello := clientHelloBytes(t, &tls.Config{ServerName: "bulk.test"})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		io.ReadFull(c, make([]byte, len(hello)))
		io.Copy(c, c) // echo
		c.CloseWrite()
	})
	h, c := activeRelay(t, hello, "bulk.test", backend)
	// A round trip first, so the relay is running before the limit bites.
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}

	exhaustDescriptors(t)
	data := randomBytes(size)
	go func() {
		c.Write(data)
		c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes (%v), want the %d sent", len(got), err, size)
	}
	if n := testutil.ToFloat64(h.srv.metrics.noPipe); n != 2 {
		t.Fatalf("portcullis_relay_pipe_unavailable_total = %v, want 2", n)
	}
}

// TestSplicerRefusesSmallPipe: once a non-root user's pipes reach
// fs.pipe-user-pages-soft, the kernel gives each new pipe two pages and
// refuses to grow it. Such a pipe is not used: the splicer fails and the
// direction relays by read/write. The quota is real, so the scenario
// runs in a copy of the test binary started as nobody.
func TestSplicerRefusesSmallPipe(t *testing.T) {
	if os.Getenv("PORTCULLIS_TEST_PIPE_QUOTA") == "1" {
		smallPipeScenario(t)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to start the scenario as another user")
	}
	if b, err := os.ReadFile("/proc/sys/fs/pipe-user-pages-soft"); err != nil || string(bytes.TrimSpace(b)) == "0" {
		t.Skip("no per-user pipe quota on this kernel")
	}
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // nobody must reach the copy
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "proxy.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestSplicerRefusesSmallPipe$", "-test.v")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PORTCULLIS_TEST_PIPE_QUOTA=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Skipf("cannot start a copy of the test binary as nobody (a noexec temp dir?): %v", err)
	}
	if err != nil {
		t.Fatalf("scenario as nobody: %v\n%s", err, out)
	}
	if bytes.Contains(out, []byte("--- SKIP: TestSplicerRefusesSmallPipe")) {
		t.Skipf("scenario as nobody skipped:\n%s", out)
	}
	if !bytes.Contains(out, []byte("--- PASS: TestSplicerRefusesSmallPipe")) {
		t.Fatalf("scenario did not run:\n%s", out)
	}
}

// smallPipeScenario runs as a non-root user: it spends the user's pipe
// quota, then relays a bulk stream.
func smallPipeScenario(t *testing.T) {
	for {
		var p [2]int
		if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC); err == syscall.EMFILE || err == syscall.ENFILE {
			t.Skip("out of descriptors before the pipe quota was spent")
		} else if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Close(p[0]); syscall.Close(p[1]) })
		if _, err := unix.FcntlInt(uintptr(p[0]), unix.F_SETPIPE_SZ, 1<<20); err == syscall.EPERM {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	size, err := unix.FcntlInt(uintptr(p[0]), unix.F_GETPIPE_SZ, 0)
	syscall.Close(p[0])
	syscall.Close(p[1])
	if err != nil || size >= minPipe {
		t.Skipf("a pipe over the quota still holds %d bytes (%v)", size, err)
	}

	writer, src := tcpPair(t)
	dst, reader := tcpPair(t)
	d, err := newDirection(dst, src)
	if err != nil {
		t.Fatal(err)
	}
	if sp, err := newSplicer(d); err != errPipeTooSmall {
		sp.close()
		t.Fatalf("newSplicer over the quota: %v, want errPipeTooSmall", err)
	}
	relayWithoutPipe(t, writer, src, dst, reader, randomBytes(2<<20))
}

// newTestSplicer makes the splicer for the direction from src to dst.
func newTestSplicer(t *testing.T, dst, src *net.TCPConn) *splicer {
	t.Helper()
	d, err := newDirection(dst, src)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := newSplicer(d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sp.close)
	return sp
}

// relayWithoutPipe relays data from writer to reader through pipe(), in
// a process that can get no usable splice pipe: every byte must arrive,
// the direction must end as done, and the missing pipe must be counted
// once, not once per chunk.
func relayWithoutPipe(t *testing.T, writer, src, dst, reader *net.TCPConn, data []byte) {
	t.Helper()
	got := stream(writer, reader, data, 0)
	noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "no_pipe"})
	n, end := pipe(dst, src, "client", 0, newActivity(src, dst), noPipe, seed{})
	if n != int64(len(data)) || end != "done" {
		t.Fatalf("relayed %d bytes, ended %q; want %d and done", n, end, len(data))
	}
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatal("the bytes that arrived differ from those sent")
	}
	if c := testutil.ToFloat64(noPipe); c != 1 {
		t.Fatalf("counted %v directions without a pipe, want 1", c)
	}
}

// exhaustDescriptors lowers the soft RLIMIT_NOFILE to just above the
// highest descriptor open now and fills every free number below it, so
// the next descriptor the process asks for fails with EMFILE. Both are
// undone when the test ends.
func exhaustDescriptors(t *testing.T) {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	highest := 0
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > highest {
			highest = fd
		}
	}
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lowered := old
	lowered.Cur = uint64(highest + 1)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lowered); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
			t.Error(err)
		}
	})
	var fillers []int
	t.Cleanup(func() {
		for _, fd := range fillers {
			syscall.Close(fd)
		}
	})
	for {
		fd, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err == syscall.EMFILE {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		fillers = append(fillers, fd)
	}
}

func notSentLowat(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		v, gerr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestAcceptFailureNamesListener: when Accept fails (here: out of
// descriptors), the error line names the listener by its name, as every
// other line does, so an operator filtering by listener sees it.
func TestAcceptFailureNamesListener(t *testing.T) {
	h, sink := startLoggedProxy(t, "[[listener]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\n"+routeTOML("x.test", "127.0.0.1:1"))
	ap := h.srv.Addr("public")
	// The client's socket is made before the descriptors run out; only
	// the proxy's accept needs a new one.
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	exhaustDescriptors(t)
	if err := syscall.Connect(fd, &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		t.Fatal(err)
	}
	var listeners []any
	testnet.WaitFor(t, "accept failure logged", func() bool {
		listeners = nil
		for _, l := range sink.lines() {
			if l["msg"] == "accept failed" {
				listeners = append(listeners, l["listener"])
			}
		}
		return len(listeners) > 0
	})
	for _, l := range listeners {
		if l != "public" {
			t.Fatalf("accept failure logged with listener %q, want the name %q", l, "public")
		}
	}
}
