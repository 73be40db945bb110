package proxy

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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

	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(i * 31)
	}
	go func() {
		writer.Write(data)
		writer.CloseWrite()
	}()
	got := make(chan [32]byte, 1)
	go func() {
		time.Sleep(50 * time.Millisecond)
		h := sha256.New()
		reader.SetReadDeadline(time.Now().Add(time.Minute))
		io.Copy(h, reader)
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		got <- sum
	}()

	d, err := newDirection(dst, src)
	if err != nil {
		t.Fatal(err)
	}
	sp := newSplicer(d)
	defer sp.close()
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
	if sum := <-got; !bytes.Equal(sum[:], func() []byte { s := sha256.Sum256(data); return s[:] }()) {
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
	d, err := newDirection(dst, src)
	if err != nil {
		t.Fatal(err)
	}
	sp := newSplicer(d)
	defer sp.close()
	src.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	n, err := sp.chunk()
	if n != 0 || !isTimeout(err) {
		t.Fatalf("silent source: %d bytes, err %v; want 0 and a timeout", n, err)
	}
	if sp.inPipe != 0 {
		t.Fatalf("%d bytes left in the pipe", sp.inPipe)
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
