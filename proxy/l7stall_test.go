package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

// TestShutdownGraceClosesBlockedL7Relay is the L7 twin of
// TestShutdownGraceClosesBlockedRelay: an HTTP/2 relay stuck writing an
// upload to a backend that granted a wide window and stopped reading is
// not woken by the client's socket closing. The end of the grace period
// must still end it, so that Shutdown returns.
func TestShutdownGraceClosesBlockedL7Relay(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "web.test")
	stop := make(chan struct{})
	backend := rawBackend(t, func(c *net.TCPConn) {
		c.SetDeadline(time.Now().Add(time.Minute))
		fr := http2.NewFramer(c, c)
		if _, err := io.ReadFull(c, make([]byte, len(http2.ClientPreface))); err != nil {
			return
		}
		if _, err := fr.ReadFrame(); err != nil { // the relay's SETTINGS
			return
		}
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
		fr.WriteSettingsAck()
		fr.WriteWindowUpdate(0, 1<<31-1-65535)
		<-stop // and never read again
	})
	h := startProxy(t, "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n"+webRouteTOML(backend, leaf.CertFile, leaf.KeyFile))
	t.Cleanup(func() { close(stop) }) // before the proxy's and the backend's cleanups

	tc, err := tls.Dial("tcp", h.addr("l"), &tls.Config{RootCAs: ca.Pool(), ServerName: "web.test", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	var hb []byte
	{
		var buf = new(headerBuf)
		enc := hpack.NewEncoder(buf)
		for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":authority", "web.test"}, {":path", "/"}} {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		hb = buf.b
	}
	fr := http2.NewFramer(tc, tc)
	io.WriteString(tc, http2.ClientPreface)
	fr.WriteSettings()
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb, EndHeaders: true})
	go func() {
		chunk := make([]byte, 16<<10)
		for fr.WriteData(1, false, chunk) == nil {
		}
	}()
	// Once the relay has the stream, the upload runs until it is stuck.
	testnet.WaitFor(t, "the stream to reach the relay", func() bool { return l7ActiveStreams(t, h) == 1 })

	h.shutdownCutting(200*time.Millisecond, "the L7 relay")
}

func l7ActiveStreams(t *testing.T, h *harness) float64 {
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() == "portcullis_l7_active_streams" {
			for _, m := range mf.GetMetric() {
				n += m.GetGauge().GetValue()
			}
		}
	}
	return n
}

type headerBuf struct{ b []byte }

func (h *headerBuf) Write(p []byte) (int, error) { h.b = append(h.b, p...); return len(p), nil }
