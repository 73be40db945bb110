package main

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// The first byte a client sends after the handshake picks what the
// backend does with the connection.
const (
	modeBulk  = 'B' // write 64 KiB chunks until the client goes away
	modePing  = 'P' // write one byte and close
	modeIdle  = 'I' // read until the client closes
	bulkChunk = 64 << 10
)

// backend is the in-process TLS server every target ends at. It runs in
// the benchmark's own process, so it shares the CPUs with the client and
// the proxy under test.
type backend struct {
	ln   net.Listener
	cfg  *tls.Config
	idle atomic.Int64 // connections currently parked in modeIdle

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  bool
	wg    sync.WaitGroup
}

func startBackend(cert tls.Certificate) (*backend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &backend{
		ln: ln,
		cfg: &tls.Config{
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
			// The clients keep no session cache, so tickets would be
			// encrypted and sent for nothing on every connection.
			SessionTicketsDisabled: true,
		},
		conns: make(map[net.Conn]struct{}),
	}
	b.wg.Add(1)
	go b.acceptLoop()
	return b, nil
}

func (b *backend) addr() string { return b.ln.Addr().String() }

func (b *backend) acceptLoop() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return // closed by close()
		}
		if !b.track(c) {
			c.Close()
			return
		}
		b.wg.Add(1)
		go b.serveConn(c)
	}
}

func (b *backend) track(c net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return false
	}
	b.conns[c] = struct{}{}
	return true
}

func (b *backend) untrack(c net.Conn) {
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
}

var bulkData = make([]byte, bulkChunk) // only ever read

func (b *backend) serveConn(raw net.Conn) {
	defer b.wg.Done()
	defer b.untrack(raw)
	defer raw.Close()

	c := tls.Server(raw, b.cfg)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var first [1]byte
	if _, err := io.ReadFull(c, first[:]); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	switch first[0] {
	case modeBulk:
		for {
			if _, err := c.Write(bulkData); err != nil {
				return
			}
		}
	case modePing:
		c.Write([]byte{'p'})
	case modeIdle:
		b.idle.Add(1)
		io.Copy(io.Discard, c)
		b.idle.Add(-1)
	}
}

// close stops accepting, closes every live connection and waits for
// their goroutines.
func (b *backend) close() {
	b.mu.Lock()
	b.done = true
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.ln.Close()
	b.wg.Wait()
}
