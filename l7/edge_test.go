package l7

import (
	"bytes"
	"fmt"
	"time"

	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/net/http2"

	"github.com/portcullis/portcullis/testnet"
)

// A backend that answers an upgrade request with 101 for another
// protocol than the one asked for gets its response refused by
// ReverseProxy (502), which then never closes the 101's body, the raw
// backend connection. The request's timer must not leave it open.
func TestRefusedUpgradeClosesBackend(t *testing.T) {
	pki := newTestPKI(t)
	var running atomic.Int32
	var mu sync.Mutex
	var hijacked []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range hijacked {
			c.Close()
		}
	})
	be := startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		running.Add(1)
		defer running.Add(-1)
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		mu.Lock()
		hijacked = append(hijacked, c)
		mu.Unlock()
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: other\r\n\r\n")
		if brw.Flush() != nil {
			return
		}
		c.Read(make([]byte, 1)) // returns once the proxy closes its side
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "http1", IdleTimeout: idleTestTimeout})
	addr := startProxy(t, h, false).addr
	c, _ := newClient(t, pki, addr, false, "")
	req := mustRequest(t, "GET", "https://"+frontName+"/tunnel", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "test")
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", res.StatusCode)
	}
	testnet.WaitFor(t, "the refused 101's backend connection to be closed", func() bool { return running.Load() == 0 })
}

// An upload that keeps moving must not be cut as stalled because its
// bytes arrive inside one large DATA frame (the backend allows 1 MiB
// frames): the relay's stall check counts whole frames read, and a
// frame that takes longer than idle_timeout to arrive looks like
// silence, though its bytes move all along. The backend answers first
// (headers and a line), then reads the upload, as a gRPC client stream
// does.
func TestRelayTrickledFrameNotStalled(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "started\n")
		http.NewResponseController(w).Flush()
		b, err := io.ReadAll(r.Body)
		fmt.Fprintf(w, "got %d %v", len(b), err)
	}))
	p := dialRelay(t, pki, Options{Backend: be.addr, Protocol: "h2c", IdleTimeout: idleTestTimeout})
	p.must(p.writeHeaders(1, false, reqFields("POST", "/upload")))
	p.until("the response headers", func() bool { return p.stream(1).header != nil })
	const size = 60 * 1000 // within the default 64 KiB windows
	if mf := p.settings[http2.SettingMaxFrameSize]; mf < size {
		t.Fatalf("backend's SETTINGS_MAX_FRAME_SIZE %d, want at least %d", mf, size)
	}
	// One DATA frame (END_STREAM) whose payload trickles in 1000-byte
	// pieces, one every idleTestTick: 6 idle timeouts in all.
	sent := make(chan error, 1)
	go func() {
		sent <- p.write(func() error {
			hdr := []byte{size >> 16, size >> 8 & 0xff, size & 0xff, 0 /* DATA */, 1 /* END_STREAM */, 0, 0, 0, 1}
			if _, err := p.conn.Write(hdr); err != nil {
				return err
			}
			piece := bytes.Repeat([]byte("u"), 1000)
			for range size / 1000 {
				time.Sleep(idleTestTick)
				if _, err := p.conn.Write(piece); err != nil {
					return err
				}
			}
			return nil
		})
	}()
	s := p.response(1)
	if err := recv(t, sent, "the upload to be written"); err != nil {
		t.Logf("upload write: %v", err)
	}
	if s.rst != nil || s.body.String() != fmt.Sprintf("started\ngot %d <nil>", size) {
		t.Fatalf("stream 1: rst %v, body %q; frames: %s", s.rst, s.body.String(), p.history())
	}
}
