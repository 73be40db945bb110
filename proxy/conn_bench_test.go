package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// BenchmarkProxiedConnection measures one short L4 connection end to
// end on loopback: accept, ClientHello peek, route, backend dial, replay,
// a one-byte answer, both closes. No TLS handshake, so the proxy's own
// per-connection cost is what dominates.
func BenchmarkProxiedConnection(b *testing.B) {
	hello := clientHelloBytes(b, &tls.Config{ServerName: "bench.test"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(c, make([]byte, len(hello))); err != nil {
					return
				}
				c.Write([]byte{1})
			}()
		}
	}()
	srv := NewServer(Options{})
	cfg := "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n" + routeTOML("bench.test", ln.Addr().String())
	snap := compileTOML(b, srv, b.TempDir(), cfg)
	if err := srv.Apply(snap); err != nil {
		b.Fatal(err)
	}
	defer srv.Shutdown(canceledCtx())
	addr := srv.Addr("l").String()
	one := make([]byte, 1)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		c.Write(hello)
		if _, err := io.ReadFull(c, one); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
