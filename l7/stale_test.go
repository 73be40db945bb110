package l7

import (
	"io"
	"net"
	"net/http/httptrace"
	"testing"
)

// TestStaleCheckRetryOnNewConnection: a request whose response on a
// pooled connection was stale, and whose connection staleCheck closed
// for it, may be retried by net/http's transport on a new connection
// (nothing of it had been written when the close won the race with the
// write: a nothingWrittenError, retried for a replayable request). The
// transport then calls GotConn again, and the response it returns is the
// new connection's: read after the request, it must not be refused as
// stale for what the first connection had buffered. Under
// TestHTTP1BackendOverlongResponse's load about a third of the stale
// 502s were such retries, whose own responses were good.
//
// The hooks are called in the order the transport calls them on that
// path, with connections dialed as the transport dials them.
func TestStaleCheckRetryOnNewConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func() (*countingConn, net.Conn) {
		t.Helper()
		c, err := countReads(net.Dial("tcp", ln.Addr().String()))
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(); s.Close() })
		return c.(*countingConn), s
	}

	var s staleCheck
	// First attempt: a pooled connection whose response was buffered
	// before the request got it (nothing read since).
	c1, _ := dial()
	s.gotConn(httptrace.GotConnInfo{Conn: c1, Reused: true})
	s.firstByte()
	if !s.isStale() {
		t.Fatal("a response with no read since GotConn was not found stale")
	}
	if _, err := c1.Write([]byte("x")); err == nil {
		t.Fatal("the stale connection was not closed")
	}

	// The retry, on a new connection: its response comes after the
	// request, in a read of its own.
	c2, backend := dial()
	s.gotConn(httptrace.GotConnInfo{Conn: c2})
	const res = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
	if _, err := io.WriteString(backend, res); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c2, make([]byte, len(res))); err != nil {
		t.Fatal(err)
	}
	s.firstByte()
	if s.isStale() {
		t.Fatal("the retry's response, read on a new connection after its request, was refused as stale")
	}
}
