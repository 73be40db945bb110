package proxy

import (
	"io"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkRelayBulk moves a stream through one relay direction between
// loopback sockets, 1 MiB per op: by splice, and by the read/write path a
// direction keeps when it cannot get a pipe. The writer and reader at
// the ends run in the same process, so the figure is the whole loopback
// transfer's, not the relay's alone; the difference between the two
// modes is the relay's.
func BenchmarkRelayBulk(b *testing.B) {
	for _, mode := range []string{"splice", "readwrite"} {
		b.Run(mode, func(b *testing.B) {
			if mode == "splice" && !spliceAvailable {
				b.Skip("no splice on this platform")
			}
			writer, src := tcpPair(b)
			dst, reader := tcpPair(b)
			d, err := newDirection(dst, src)
			if err != nil {
				b.Fatal(err)
			}
			d.pipeless = mode == "readwrite"
			defer func() { d.sp.close() }() // d.sp is set by the first full chunk
			const perOp = 1 << 20
			block := make([]byte, perOp)
			go func() {
				for range b.N {
					if _, err := writer.Write(block); err != nil {
						return
					}
				}
				writer.CloseWrite()
			}()
			go io.Copy(io.Discard, reader)
			noPipe := prometheus.NewCounter(prometheus.CounterOpts{Name: "no_pipe"})
			b.SetBytes(perOp)
			b.ResetTimer()
			var total int64
			for {
				n, err := d.step(noPipe)
				total += n
				if err == io.EOF {
					break
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			if want := int64(b.N) * perOp; total != want {
				b.Fatalf("moved %d bytes, want %d", total, want)
			}
			if (d.sp != nil) != (mode == "splice") {
				b.Fatalf("%s: splicer in use: %v", mode, d.sp != nil)
			}
		})
	}
}
