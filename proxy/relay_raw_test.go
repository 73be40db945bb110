package proxy

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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

// TestWriteTimeoutKeepsChunk: a write that times out because the
// destination's reader paused keeps the unwritten rest of its chunk, and
// the next step writes that before reading more, so the stream arrives
// whole and in order: by read/write and by splice.
func TestWriteTimeoutKeepsChunk(t *testing.T) {
	for _, mode := range []string{"readwrite", "splice"} {
		t.Run(mode, func(t *testing.T) {
			if mode == "splice" && !spliceAvailable {
				t.Skip("no splice on this platform")
			}
			writer, src := tcpPair(t)
			dst, reader := tcpPair(t)
			dst.SetWriteBuffer(128 << 10)
			reader.SetReadBuffer(128 << 10)
			d, err := newDirection(dst, src)
			if err != nil {
				t.Fatal(err)
			}
			d.pipeless = mode == "readwrite"
			defer func() { d.sp.close() }() // d.sp is set by the first full chunk

			data := randomBytes(4 << 20)
			got := stream(writer, reader, data, 200*time.Millisecond) // many write timeouts' worth
			noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "no_pipe"})
			var total int64
			timeouts := 0
			readDeadline := time.Now().Add(time.Minute)
			src.SetReadDeadline(readDeadline)
			for {
				if time.Now().After(readDeadline) {
					t.Fatalf("stalled after %d bytes", total)
				}
				dst.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
				n, err := d.step(noPipe)
				total += n
				if err == io.EOF {
					break
				}
				if errors.Is(err, os.ErrDeadlineExceeded) {
					timeouts++
					continue
				}
				if err != nil {
					t.Fatalf("after %d bytes: %v", total, err)
				}
			}
			dst.CloseWrite()
			if timeouts == 0 {
				t.Fatal("no write timed out, so nothing was resumed")
			}
			if (d.sp != nil) != (mode == "splice") {
				t.Fatalf("%s: splicer in use: %v", mode, d.sp != nil)
			}
			if b := <-got; total != int64(len(data)) || !bytes.Equal(b, data) {
				t.Fatalf("moved %d bytes, %d arrived; want all %d intact", total, len(b), len(data))
			}
		})
	}
}

// stream writes data to w in the background and then half-closes it.
// The channel yields everything r receives up to EOF, read from after
// readDelay so that the sockets between can fill up first.
func stream(w, r *net.TCPConn, data []byte, readDelay time.Duration) <-chan []byte {
	go func() {
		w.Write(data)
		w.CloseWrite()
	}()
	got := make(chan []byte, 1)
	go func() {
		time.Sleep(readDelay)
		r.SetReadDeadline(time.Now().Add(time.Minute))
		b, _ := io.ReadAll(r)
		got <- b
	}()
	return got
}

// randomBytes returns n bytes that never repeat a pattern, so data that
// arrives reordered or twice cannot compare equal to what was sent.
func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{1}).Read(b)
	return b
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
