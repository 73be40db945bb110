package main

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// TestMain runs the floor itself when the test binary is re-executed by
// startFloor, so the tests drive a real process over real sockets.
func TestMain(m *testing.M) {
	if os.Getenv("FLOOR_CHILD") == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// A record header and body standing in for a ClientHello: the floor
// reads one record before it connects, whatever the record holds.
var fakeHello = append([]byte{0x16, 0x03, 0x01, 0x00, 0x04}, "ping"...)

const downloadSize = 8 << 20

// TestRelay checks both models the way the benchmark uses them: the
// first record reaches the backend, bytes flow both ways (a download
// large enough to fill the socket buffers, so writes come up short and
// wait), and a half-close each way is passed on with the other
// direction still working.
func TestRelay(t *testing.T) {
	for _, model := range []string{"goroutines", "epoll"} {
		t.Run(model, func(t *testing.T) {
			backend := startBackend(t)
			addr := startFloor(t, model, backend)

			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			upload := append(append([]byte{}, fakeHello...), "upload"...)
			if _, err := c.Write(upload); err != nil {
				t.Fatal(err)
			}
			c.(*net.TCPConn).CloseWrite()
			// Read slowly at first so the relay's writes to us block.
			time.Sleep(200 * time.Millisecond)
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			want := expectedReply(upload)
			if len(got) != len(want) || sha256.Sum256(got) != sha256.Sum256(want) {
				t.Fatalf("client got %d bytes, want %d (the download, then the upload echoed after its EOF)", len(got), len(want))
			}
		})
	}
}

// expectedReply is what the backend sends for an upload: a download of
// downloadSize pattern bytes, then, after the client's EOF, the upload
// echoed back.
func expectedReply(upload []byte) []byte {
	return append(pattern(downloadSize), upload...)
}

func pattern(n int) []byte {
	return bytes.Repeat([]byte("0123456789abcdef"), n/16)
}

// startBackend accepts connections that download downloadSize bytes at
// once and, when their upload ends, get it echoed and are closed.
func startBackend(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				done := make(chan error, 1)
				go func() { _, err := c.Write(pattern(downloadSize)); done <- err }()
				upload, err := io.ReadAll(c)
				if err != nil || <-done != nil {
					return
				}
				c.Write(upload)
			}()
		}
	}()
	return ln.Addr().String()
}

// startFloor runs this test binary as the floor with the given model
// and returns the address it accepts on.
func startFloor(t *testing.T, model, backend string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(os.Args[0], "-model", model, "-listen", addr, "-backend", backend)
	cmd.Env = append(os.Environ(), "FLOOR_CHILD=1")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("floor -model %s never listened on %s: %v (pid %s)", model, addr, err, strconv.Itoa(cmd.Process.Pid))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
