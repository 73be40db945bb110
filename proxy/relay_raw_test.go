package proxy

import (
	"bytes"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// TestChunkWriterWaitsForRoom drives the relay's raw write through a
// socket whose peer does not read yet: the kernel buffers fill, write(2)
// says EAGAIN, and the writer must wait for room and carry on where it
// stopped, so every byte arrives once and in order.
func TestChunkWriterWaitsForRoom(t *testing.T) {
	sender, receiver := tcpPair(t)
	sender.SetWriteBuffer(64 << 10)
	receiver.SetReadBuffer(64 << 10)

	want := make([]byte, 2<<20) // far more than both buffers hold
	for i := range want {
		want[i] = byte(i * 7)
	}
	rc, err := sender.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	// The writer must hit EAGAIN: the first raw write cannot take it all.
	var first int
	rc.Control(func(fd uintptr) { first, _ = rawWrite(fd, want) })
	if first <= 0 || first >= len(want) {
		t.Fatalf("first raw write took %d of %d bytes; the test needs a partial write", first, len(want))
	}

	got := make(chan []byte, 1)
	go func() {
		time.Sleep(50 * time.Millisecond) // let the writer find the buffers full
		receiver.SetReadDeadline(time.Now().Add(time.Minute))
		b, _ := io.ReadAll(io.LimitReader(receiver, int64(len(want))))
		got <- b
	}()
	cw := chunkWriter{p: want[first:]}
	sender.SetWriteDeadline(time.Now().Add(time.Minute))
	if err := rc.Write(cw.write); err != nil {
		t.Fatal(err)
	}
	if cw.err != nil || cw.n != len(want)-first {
		t.Fatalf("wrote %d of %d bytes, err %v", cw.n, len(want)-first, cw.err)
	}
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("received %d bytes, not the %d sent in order", len(b), len(want))
	}
}

// TestChunkWriterReportsReset: a peer that is gone makes the raw write
// fail with the errno the relay's end reasons look for.
func TestChunkWriterReportsReset(t *testing.T) {
	sender, receiver := tcpPair(t)
	receiver.SetLinger(0)
	receiver.Close() // RST
	rc, err := sender.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	sender.SetWriteDeadline(time.Now().Add(time.Minute))
	var cw chunkWriter
	for i := 0; i < 100 && cw.err == nil; i++ {
		cw = chunkWriter{p: make([]byte, 1024)}
		if err := rc.Write(cw.write); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	if cw.err != syscall.ECONNRESET && cw.err != syscall.EPIPE {
		t.Fatalf("write to a reset peer: err %v, want ECONNRESET or EPIPE", cw.err)
	}
	if r := endReason(cw.err, "backend"); r != "backend_reset" && r != "client_reset" {
		t.Fatalf("end reason %q", r)
	}
}

// tcpPair is a connected pair of loopback sockets.
func tcpPair(t testing.TB) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b, err = ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}
