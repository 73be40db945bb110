package main

import (
	"io"
	"net"
	"sync"
)

func serveGoroutines(listen, backend string) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go relayGoroutines(c.(*net.TCPConn), backend)
	}
}

func relayGoroutines(c *net.TCPConn, backend string) {
	defer c.Close()
	var hdr [5]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return
	}
	hello := make([]byte, 5+recordLen(hdr[:]))
	copy(hello, hdr[:])
	if _, err := io.ReadFull(c, hello[5:]); err != nil {
		return
	}
	nc, err := net.Dial("tcp", backend)
	if err != nil {
		return
	}
	b := nc.(*net.TCPConn)
	defer b.Close()
	if _, err := b.Write(hello); err != nil {
		return
	}
	// io.Copy between two *net.TCPConn splices, as Go's own relay would.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(b, c)
		b.CloseWrite()
	}()
	io.Copy(c, b)
	c.CloseWrite()
	wg.Wait()
}
