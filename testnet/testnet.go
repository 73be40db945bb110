// Package testnet holds loopback helpers shared by the tests of several
// packages: real ClientHellos from crypto/tls, small TCP backends, and
// polling for state another goroutine updates.
package testnet

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// ClientHello returns the first flight a real crypto/tls client sends
// for cfg: one TLS record holding the ClientHello.
func ClientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	cli, srv := net.Pipe()
	defer srv.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		tls.Client(cli, cfg).Handshake()
		cli.Close()
	}()
	defer func() { srv.Close(); <-done }()
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(srv, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(srv, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

// Backend accepts TCP on 127.0.0.1 and runs serve for each connection
// until the test ends; it returns the address.
func Backend(t testing.TB, serve func(c *net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String()
}

// NamedBackend is a Backend that reads a ClientHello record, answers
// with name and a newline, then echoes until the client closes.
func NamedBackend(t testing.TB, name string) string {
	return Backend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		hdr := make([]byte, 5)
		if _, err := io.ReadFull(c, hdr); err != nil {
			return
		}
		if _, err := io.ReadFull(c, make([]byte, int(hdr[3])<<8|int(hdr[4]))); err != nil {
			return
		}
		io.WriteString(c, name+"\n")
		io.Copy(c, c)
	})
}

// Ask connects to addr, sends hello and returns the backend's first line.
func Ask(addr string, hello []byte) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(hello); err != nil {
		return "", err
	}
	return ReadLine(c)
}

// ReadLine reads up to a newline, one byte at a time so nothing after it
// is consumed.
func ReadLine(r io.Reader) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for {
		if _, err := r.Read(one); err != nil {
			return string(b), err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
}

// WaitFor polls cond until it holds, failing the test after 10 s. It is
// for state another goroutine updates after the client has already seen
// its answer (counters, connection bookkeeping), never for timing.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
