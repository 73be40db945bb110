package l7

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testnet"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Tests of the HTTP/2 frame relay (relay.go, relay_headers.go): an h2
// client on an L7 route whose backend speaks h2c or h2.
//
// Where a test needs to see or send individual frames it drives a raw
// HTTP/2 connection (h2Peer) on the client side, the backend side, or both.

// rawWait bounds each wait for a frame on a raw connection. It turns a
// hang into a failure (and ends one wait that may have nothing to show,
// see TestRelayDrainWhileHoldingData); no passing test waits for it.
const rawWait = 5 * time.Second

// relayTestTimeout is the response timeout of tests that expect a 504.
// Their other requests must get headers within it, so it is generous
// enough for a loaded, race-instrumented 2-core machine.
const relayTestTimeout = time.Second

var errNoFrame = errors.New("no frame arrived")

// ---------------------------------------------------------------------
// Raw HTTP/2 peers

type goAwayInfo struct {
	last uint32
	code http2.ErrCode
}

// h2Stream is what a raw peer has received on one stream.
type h2Stream struct {
	header    []hpack.HeaderField   // first non-1xx header block
	info      [][]hpack.HeaderField // 1xx header blocks
	trailer   []hpack.HeaderField
	body      bytes.Buffer
	flow      int64 // flow-controlled length of the DATA received
	ended     bool  // END_STREAM received
	rst       *http2.ErrCode
	late      int  // frames received after END_STREAM or RST_STREAM
	responded bool // raw backend: answered by serveRequests
}

func (s *h2Stream) done() bool     { return s.ended || s.rst != nil }
func (s *h2Stream) status() string { return fieldValue(s.header, ":status") }

// h2Peer is one end of an HTTP/2 connection driven frame by frame. Its read
// side (step and everything it updates) belongs to one goroutine; writes
// may come from any.
type h2Peer struct {
	t    *testing.T
	conn net.Conn
	br   *bufio.Reader
	fr   *http2.Framer
	wait time.Duration // read deadline per frame; 0 waits for ever

	wmu      sync.Mutex
	enc      *hpack.Encoder
	encBuf   bytes.Buffer
	maxFrame int // the other side's SETTINGS_MAX_FRAME_SIZE

	settings       map[http2.SettingID]uint32 // the other side's, as last received
	settingsLog    [][]http2.Setting          // every non-ACK SETTINGS frame received
	settingsFrames int
	acks           int
	pings          [][8]byte // PINGs received
	pingAcks       [][8]byte
	goAway         *goAwayInfo  // the last GOAWAY received
	goAways        []goAwayInfo // all of them, in order
	pushes         int
	maxData        uint32 // the longest DATA frame received
	streams        map[uint32]*h2Stream
	recvConn       int64 // flow-controlled bytes received on the connection
	sendConn       int64 // connection send window
	sendStream     map[uint32]int64
	connWU         []uint32 // connection-level WINDOW_UPDATE increments received
	autoCredit     bool     // give back the window of every DATA frame received
	readErr        error
	events         []string
}

func newH2Peer(t *testing.T, c net.Conn, tableSize uint32) *h2Peer {
	p := &h2Peer{
		t:          t,
		conn:       c,
		br:         bufio.NewReader(c),
		maxFrame:   16384,
		settings:   make(map[http2.SettingID]uint32),
		streams:    make(map[uint32]*h2Stream),
		sendConn:   65535,
		sendStream: make(map[uint32]int64),
	}
	p.fr = http2.NewFramer(c, p.br)
	p.fr.ReadMetaHeaders = hpack.NewDecoder(tableSize, nil)
	p.enc = hpack.NewEncoder(&p.encBuf)
	return p
}

func (p *h2Peer) event(format string, args ...any) {
	p.events = append(p.events, fmt.Sprintf(format, args...))
}

func (p *h2Peer) history() string {
	ev := p.events
	if len(ev) > 40 {
		ev = ev[len(ev)-40:]
	}
	return strings.Join(ev, "; ")
}

// eventIndex returns the index of the first event starting with prefix, or -1.
func (p *h2Peer) eventIndex(prefix string) int {
	return slices.IndexFunc(p.events, func(e string) bool { return strings.HasPrefix(e, prefix) })
}

func (p *h2Peer) stream(id uint32) *h2Stream {
	s := p.streams[id]
	if s == nil {
		s = &h2Stream{}
		p.streams[id] = s
	}
	return s
}

func (p *h2Peer) initialWindow() int64 {
	if v, ok := p.settings[http2.SettingInitialWindowSize]; ok {
		return int64(v)
	}
	return 65535
}

func (p *h2Peer) streamWindow(id uint32) int64 {
	if w, ok := p.sendStream[id]; ok {
		return w
	}
	return p.initialWindow()
}

func (p *h2Peer) recordSettings(f *http2.SettingsFrame) {
	var list []http2.Setting
	var names []string
	f.ForeachSetting(func(s http2.Setting) error {
		list = append(list, s)
		names = append(names, s.String())
		switch s.ID {
		case http2.SettingInitialWindowSize:
			old := p.initialWindow()
			for id, w := range p.sendStream {
				p.sendStream[id] = w + int64(s.Val) - old
			}
		case http2.SettingMaxFrameSize:
			p.wmu.Lock()
			p.maxFrame = int(s.Val)
			p.wmu.Unlock()
		}
		p.settings[s.ID] = s.Val
		return nil
	})
	p.settingsLog = append(p.settingsLog, list)
	p.settingsFrames++
	p.event("SETTINGS [%s]", strings.Join(names, " "))
}

// step reads one frame and records it, answering SETTINGS and PINGs.
func (p *h2Peer) step() error {
	if p.readErr != nil {
		return p.readErr
	}
	if p.wait > 0 {
		p.conn.SetReadDeadline(time.Now().Add(p.wait))
	}
	f, err := p.fr.ReadFrame()
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("%w within %v", errNoFrame, p.wait)
		}
		var se http2.StreamError
		if errors.As(err, &se) {
			p.event("stream error %v", se)
			return err
		}
		p.readErr = err
		p.event("read error: %v", err)
		return err
	}
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		id := f.StreamID
		s := p.stream(id)
		status := f.PseudoValue("status")
		p.event("HEADERS %d end=%v status=%s", id, f.StreamEnded(), status)
		if s.done() {
			s.late++
		}
		switch {
		case s.header == nil && strings.HasPrefix(status, "1"):
			s.info = append(s.info, f.Fields)
		case s.header == nil:
			s.header = f.Fields
		default:
			s.trailer = f.Fields
		}
		if f.StreamEnded() {
			s.ended = true
		}
	case *http2.DataFrame:
		id := f.StreamID
		s := p.stream(id)
		p.event("DATA %d len=%d end=%v", id, f.Length, f.StreamEnded())
		if s.done() {
			s.late++
		}
		s.body.Write(f.Data())
		s.flow += int64(f.Length)
		p.recvConn += int64(f.Length)
		p.maxData = max(p.maxData, f.Length)
		if f.StreamEnded() {
			s.ended = true
		}
		if n := f.Length; p.autoCredit && n > 0 {
			err = p.write(func() error {
				if err := p.fr.WriteWindowUpdate(0, n); err != nil || s.done() {
					return err
				}
				return p.fr.WriteWindowUpdate(id, n)
			})
		}
	case *http2.RSTStreamFrame:
		s := p.stream(f.StreamID)
		p.event("RST_STREAM %d %v", f.StreamID, f.ErrCode)
		if s.done() {
			s.late++
		}
		code := f.ErrCode
		s.rst = &code
	case *http2.SettingsFrame:
		if f.IsAck() {
			p.acks++
			p.event("SETTINGS ACK")
			break
		}
		p.recordSettings(f)
		err = p.write(p.fr.WriteSettingsAck)
	case *http2.PingFrame:
		p.event("PING ack=%v %q", f.IsAck(), f.Data[:])
		if f.IsAck() {
			p.pingAcks = append(p.pingAcks, f.Data)
			break
		}
		p.pings = append(p.pings, f.Data)
		data := f.Data
		err = p.write(func() error { return p.fr.WritePing(true, data) })
	case *http2.WindowUpdateFrame:
		p.event("WINDOW_UPDATE %d +%d", f.StreamID, f.Increment)
		if f.StreamID == 0 {
			p.sendConn += int64(f.Increment)
			p.connWU = append(p.connWU, f.Increment)
		} else {
			p.sendStream[f.StreamID] = p.streamWindow(f.StreamID) + int64(f.Increment)
		}
	case *http2.GoAwayFrame:
		p.event("GOAWAY last=%d %v", f.LastStreamID, f.ErrCode)
		p.goAway = &goAwayInfo{f.LastStreamID, f.ErrCode}
		p.goAways = append(p.goAways, *p.goAway)
	case *http2.PushPromiseFrame:
		p.event("PUSH_PROMISE %d promised=%d", f.StreamID, f.PromiseID)
		p.pushes++
	default:
		p.event("%v", f.Header().Type)
	}
	return err
}

// waitCond reads frames until cond holds.
func (p *h2Peer) waitCond(cond func() bool) error {
	for !cond() {
		if err := p.step(); err != nil && !cond() {
			return err
		}
	}
	return nil
}

// until is waitCond for the test goroutine: it fails the test instead.
func (p *h2Peer) until(what string, cond func() bool) {
	p.t.Helper()
	if err := p.waitCond(cond); err != nil {
		p.t.Fatalf("waiting for %s: %v\nframes: %s", what, err, p.history())
	}
}

func (p *h2Peer) must(err error) {
	p.t.Helper()
	if err != nil {
		p.t.Fatal(err)
	}
}

func (p *h2Peer) write(fn func() error) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	return fn()
}

// writeDataInFrames sends body on stream id as DATA frames of at most
// frame bytes, the last one ending the stream, all in one write so the
// reader gets many frames at a time.
func (p *h2Peer) writeDataInFrames(id uint32, body []byte, frame int) error {
	var buf bytes.Buffer
	bf := http2.NewFramer(&buf, nil)
	for off := 0; off < len(body); off += frame {
		end := min(off+frame, len(body))
		bf.WriteData(id, end == len(body), body[off:end])
	}
	return p.write(func() error { _, err := p.conn.Write(buf.Bytes()); return err })
}

// encode HPACK-encodes fields; the block must be sent before the next one
// is encoded.
func (p *h2Peer) encode(fields []hpack.HeaderField) []byte {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	return p.encodeLocked(fields)
}

func (p *h2Peer) encodeLocked(fields []hpack.HeaderField) []byte {
	p.encBuf.Reset()
	for _, f := range fields {
		p.enc.WriteField(f)
	}
	return bytes.Clone(p.encBuf.Bytes())
}

// writeFragments sends a header block already cut into fragments: HEADERS
// and then a CONTINUATION for each further fragment.
func (p *h2Peer) writeFragments(id uint32, end bool, frags ...[]byte) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	return p.writeFragmentsLocked(id, end, frags)
}

func (p *h2Peer) writeFragmentsLocked(id uint32, end bool, frags [][]byte) error {
	err := p.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: frags[0], EndStream: end, EndHeaders: len(frags) == 1,
	})
	for i, frag := range frags[1:] {
		if err != nil {
			break
		}
		err = p.fr.WriteContinuation(id, i == len(frags)-2, frag)
	}
	return err
}

// writeHeaders encodes and sends a header block, split at the other side's
// frame size.
func (p *h2Peer) writeHeaders(id uint32, end bool, fields []hpack.HeaderField) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	return p.writeFragmentsLocked(id, end, splitBytes(p.encodeLocked(fields), p.maxFrame))
}

// sendData writes data on stream id in frames of up to chunk bytes, frame i
// padded with pad(i) bytes (negative or nil pad: no padding), waiting for
// flow-control window as it goes.
func (p *h2Peer) sendData(id uint32, data []byte, chunk int, pad func(i int) int, end bool) error {
	for i := 0; ; i++ {
		n := min(chunk, len(data))
		padLen := -1
		if pad != nil {
			padLen = pad(i)
		}
		need := int64(n)
		if padLen >= 0 {
			need += int64(padLen) + 1
		}
		for p.sendConn < need || p.streamWindow(id) < need {
			if err := p.step(); err != nil {
				return fmt.Errorf("waiting for window (conn %d, stream %d, need %d): %w", p.sendConn, p.streamWindow(id), need, err)
			}
		}
		last := n == len(data)
		err := p.write(func() error {
			if padLen < 0 {
				return p.fr.WriteData(id, end && last, data[:n])
			}
			return p.fr.WriteDataPadded(id, end && last, data[:n], make([]byte, padLen))
		})
		if err != nil {
			return err
		}
		p.sendConn -= need
		p.sendStream[id] = p.streamWindow(id) - need
		data = data[n:]
		if last {
			return nil
		}
	}
}

func (p *h2Peer) get(id uint32, path string, kv ...string) {
	p.t.Helper()
	p.must(p.writeHeaders(id, true, reqFields("GET", path, kv...)))
}

func (p *h2Peer) ping(data string) {
	p.t.Helper()
	var d [8]byte
	copy(d[:], data)
	p.must(p.write(func() error { return p.fr.WritePing(false, d) }))
	p.until("PING ACK "+data, func() bool { return slices.Contains(p.pingAcks, d) })
}

// response waits for stream id to end (END_STREAM or RST_STREAM).
func (p *h2Peer) response(id uint32) *h2Stream {
	p.t.Helper()
	s := p.stream(id)
	p.until(fmt.Sprintf("the end of stream %d", id), s.done)
	return s
}

// serveRequests is a raw backend's loop: respond is called for every
// complete request, until the connection ends.
func (p *h2Peer) serveRequests(respond func(id uint32, s *h2Stream)) {
	for {
		for id, s := range p.streams {
			if s.ended && s.header != nil && !s.responded {
				s.responded = true
				respond(id, s)
			}
		}
		if p.step() != nil {
			return
		}
	}
}

func splitBytes(b []byte, n int) [][]byte {
	var out [][]byte
	for len(b) > n {
		out = append(out, b[:n])
		b = b[n:]
	}
	return append(out, b)
}

func fields(kv ...string) []hpack.HeaderField {
	var fs []hpack.HeaderField
	for i := 0; i+1 < len(kv); i += 2 {
		fs = append(fs, hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return fs
}

func reqFields(method, path string, kv ...string) []hpack.HeaderField {
	return append(fields(":method", method, ":scheme", "https", ":authority", frontName, ":path", path), fields(kv...)...)
}

func fieldValues(fs []hpack.HeaderField, name string) []string {
	var vs []string
	for _, f := range fs {
		if f.Name == name {
			vs = append(vs, f.Value)
		}
	}
	return vs
}

func fieldValue(fs []hpack.HeaderField, name string) string {
	if vs := fieldValues(fs, name); len(vs) > 0 {
		return vs[0]
	}
	return ""
}

// dialRelay serves a handler made with o behind a test proxy and
// connects a raw HTTP/2 client to it over TLS.
func dialRelay(t *testing.T, pki *testPKI, o Options) *h2Peer {
	t.Helper()
	return dialRaw(t, pki, startProxy(t, newTestHandler(t, pki, o), false).addr)
}

// dialRaw opens a raw h2 connection to the proxy, sends the preface with
// settings, and reads the relay's SETTINGS, which must come first. A
// SETTINGS_HEADER_TABLE_SIZE among settings also sizes its HPACK decoder.
func dialRaw(t *testing.T, pki *testPKI, addr string, settings ...http2.Setting) *h2Peer {
	t.Helper()
	return dialRawOver(t, pki, addr, nil, settings...)
}

// dialRawOver is dialRaw with the TCP connection passed through wrap
// (when not nil) before TLS starts on it.
func dialRawOver(t *testing.T, pki *testPKI, addr string, wrap func(net.Conn) net.Conn, settings ...http2.Setting) *h2Peer {
	t.Helper()
	table := uint32(4096)
	maxRead := uint32(16384)
	for _, s := range settings {
		switch s.ID {
		case http2.SettingHeaderTableSize:
			table = s.Val
		case http2.SettingMaxFrameSize:
			maxRead = s.Val
		}
	}
	nc, err := net.DialTimeout("tcp", addr, rawWait)
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		nc = wrap(nc)
	}
	tc := tls.Client(nc, &tls.Config{RootCAs: pki.pool, ServerName: frontName, NextProtos: []string{"h2"}})
	t.Cleanup(func() { tc.Close() })
	tc.SetDeadline(time.Now().Add(rawWait))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	tc.SetDeadline(time.Time{})
	if got := tc.ConnectionState().NegotiatedProtocol; got != "h2" {
		t.Fatalf("ALPN %q, want h2", got)
	}
	p := newH2Peer(t, tc, table)
	p.wait = rawWait
	p.fr.SetMaxReadFrameSize(maxRead)
	p.must(p.write(func() error {
		if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
			return err
		}
		return p.fr.WriteSettings(settings...)
	}))
	p.must(p.step())
	if p.settingsFrames != 1 {
		t.Fatalf("relay's first frame: %s; want SETTINGS", p.history())
	}
	return p
}

// acceptH2 does the server side of the connection preface on c: it reads
// the preface and the relay's SETTINGS, then sends settings and the ACK.
func acceptH2(t *testing.T, c net.Conn, settings []http2.Setting) (*h2Peer, error) {
	p := newH2Peer(t, c, 4096)
	c.SetReadDeadline(time.Now().Add(rawWait))
	defer c.SetReadDeadline(time.Time{})
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(p.br, preface); err != nil {
		return nil, err
	}
	if string(preface) != http2.ClientPreface {
		return nil, fmt.Errorf("bad preface %q", preface)
	}
	f, err := p.fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return nil, fmt.Errorf("first frame %v, want SETTINGS", f.Header())
	}
	p.recordSettings(sf)
	err = p.write(func() error {
		if err := p.fr.WriteSettings(settings...); err != nil {
			return err
		}
		return p.fr.WriteSettingsAck()
	})
	return p, err
}

// startRawBackend accepts connections on a loopback port (with TLS when
// tlsConf is set), does the server preface with settings and runs serve on
// each connection in its own goroutine. Its cleanup closes everything.
func startRawBackend(t *testing.T, tlsConf *tls.Config, settings []http2.Setting, serve func(p *h2Peer)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = make(map[net.Conn]struct{})
		closed bool
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				nc := c
				if tlsConf != nil {
					tc := tls.Server(c, tlsConf)
					if err := tc.Handshake(); err != nil {
						return
					}
					nc = tc
				}
				p, err := acceptH2(t, nc, settings)
				if err != nil {
					return
				}
				serve(p)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// ---------------------------------------------------------------------
// Go backends and clients

// startH2CBackend serves handler over prior-knowledge h2c (and HTTP/1.1)
// with the given HTTP/2 settings.
func startH2CBackend(t *testing.T, cfg *http.HTTP2Config, handler http.Handler) *testBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	be := &testBackend{addr: ln.Addr().String()}
	srv := &http.Server{
		Handler:   handler,
		Protocols: new(http.Protocols),
		HTTP2:     cfg,
		ErrorLog:  nopLogger(),
		ConnState: be.countConns,
	}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	var wg sync.WaitGroup
	wg.Go(func() { srv.Serve(ln) })
	t.Cleanup(func() {
		srv.Close()
		wg.Wait()
	})
	return be
}

// holdOn is a handler that answers "ok", except on path: there it
// signals started, then answers reply once release is closed, or nothing
// if the request ends first.
func holdOn(path, reply string, started chan<- struct{}, release <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != path {
			io.WriteString(w, "ok")
			return
		}
		started <- struct{}{}
		select {
		case <-release:
			io.WriteString(w, reply)
		case <-r.Context().Done():
		}
	})
}

// newH2Client is newClient speaking h2 with the given HTTP/2 settings.
func newH2Client(t *testing.T, pki *testPKI, addr string, cfg *http.HTTP2Config) (*http.Client, *dialLog) {
	t.Helper()
	c, dials := newClient(t, pki, addr, true, "")
	c.Transport.(*http.Transport).HTTP2 = cfg
	return c, dials
}

// releaser returns a channel and a function closing it once; the function
// is also registered as a cleanup, so that a failing test still lets
// blocked handlers go before the servers are stopped.
func releaser(t *testing.T) (chan struct{}, func()) {
	ch := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	return ch, release
}

// recv waits for a value on ch, failing the test after rawWait.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(rawWait):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func routeCounter(m *Metrics, codeClass string) float64 {
	return testutil.ToFloat64(m.requests.WithLabelValues("test", frontName, codeClass))
}

func backendErrors(m *Metrics, kind string) float64 {
	return testutil.ToFloat64(m.backendErrors.WithLabelValues("test", frontName, kind))
}

func activeStreams(m *Metrics) float64 {
	return testutil.ToFloat64(m.activeStreams.WithLabelValues("test", frontName))
}

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(b)
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// ---------------------------------------------------------------------
// Tests

// 1. Bulk data both ways through small flow-control windows, several
// streams at once on one connection.
func TestRelayBulkSmallWindows(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	small := &http.HTTP2Config{MaxReceiveBufferPerConnection: 64 << 10, MaxReceiveBufferPerStream: 16 << 10}
	be := startH2CBackend(t, small, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			io.WriteString(w, "ok")
			return
		}
		// Echo while reading, and report in a trailer what arrived.
		w.Header().Set("Trailer", "X-Received-Sha256")
		h := sha256.New()
		if _, err := io.Copy(w, io.TeeReader(r.Body, h)); err != nil {
			return
		}
		w.Header().Set("X-Received-Sha256", hex.EncodeToString(h.Sum(nil)))
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	c, dials := newH2Client(t, pki, addr, small)
	if code, _ := getStatus(t, c, url+"/warmup"); code != http.StatusOK {
		t.Fatalf("warmup: %d", code)
	}

	const size, parallel = 8 << 20, 4
	var wg sync.WaitGroup
	for i := range parallel {
		wg.Go(func() {
			body := randomBytes(uint64(i+1), size)
			want := sha(body)
			req, err := http.NewRequest("POST", fmt.Sprintf("%s/bulk/%d", url, i), bytes.NewReader(body))
			if err != nil {
				t.Error(err)
				return
			}
			res, err := c.Do(req)
			if err != nil {
				t.Errorf("stream %d: %v", i, err)
				return
			}
			defer res.Body.Close()
			got := sha256.New()
			n, err := io.Copy(got, res.Body)
			if err != nil {
				t.Errorf("stream %d: reading echo after %d bytes: %v", i, n, err)
				return
			}
			if res.StatusCode != http.StatusOK || n != size || hex.EncodeToString(got.Sum(nil)) != want {
				t.Errorf("stream %d: status %d, echoed %d bytes, sha256 match %v; want 200, %d bytes, match",
					i, res.StatusCode, n, hex.EncodeToString(got.Sum(nil)) == want, size)
			}
			if rs := res.Trailer.Get("X-Received-Sha256"); rs != want {
				t.Errorf("stream %d: backend received sha256 %q, want %q", i, rs, want)
			}
		})
	}
	wg.Wait()
	if d := dials.count(); d != 1 {
		t.Errorf("client made %d connections, want 1", d)
	}
}

// 2. A body in padded DATA frames: the backend gets exactly the data, and
// the window (padding included) keeps flowing for later requests.
func TestRelayPaddedRequestBody(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	// One 64 KiB window per connection and per stream: the bodies below
	// only get through if every WINDOW_UPDATE, padding included, does.
	be := startH2CBackend(t, &http.HTTP2Config{MaxReceiveBufferPerConnection: 65535, MaxReceiveBufferPerStream: 65535},
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			fmt.Fprintf(w, "%d %s", len(b), sha(b))
		}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr)
	p.autoCredit = true

	// More padding than one connection window: if any of it were lost
	// on the way (not forwarded, not credited back), the client's window
	// would run dry.
	const chunk = 500
	data := randomBytes(7, 250_000)
	pads := []int{255, 0, 255, 255, -1, 255, 17}
	padding := 0
	for i := range (len(data) + chunk - 1) / chunk {
		if pd := pads[i%len(pads)]; pd >= 0 {
			padding += pd + 1
		}
	}
	if padding <= 65535 {
		t.Fatalf("test body has only %d bytes of padding", padding)
	}
	p.must(p.writeHeaders(1, false, reqFields("POST", "/padded")))
	p.must(p.sendData(1, data, chunk, func(i int) int { return pads[i%len(pads)] }, true))
	s := p.response(1)
	if want := fmt.Sprintf("%d %s", len(data), sha(data)); s.status() != "200" || s.body.String() != want {
		t.Fatalf("padded body: status %s body %q; want 200 %q", s.status(), s.body.String(), want)
	}

	// The connection still carries a body larger than one window.
	data2 := randomBytes(8, 100_000)
	p.must(p.writeHeaders(3, false, reqFields("POST", "/plain")))
	p.must(p.sendData(3, data2, 16384, nil, true))
	s = p.response(3)
	if want := fmt.Sprintf("%d %s", len(data2), sha(data2)); s.status() != "200" || s.body.String() != want {
		t.Fatalf("second body: status %s body %q; want 200 %q", s.status(), s.body.String(), want)
	}
}

// 3. The response timeout: 504 from the relay, the backend's request
// cancelled, and the client connection keeps working.
func TestRelayResponseTimeout(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	cancelled := make(chan struct{}, 1)
	release, _ := releaser(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			select {
			case <-release:
				io.WriteString(w, "late")
			case <-r.Context().Done():
				cancelled <- struct{}{}
			}
			return
		}
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Path", r.URL.Path)
		w.Header().Set("X-Repeat", strings.Repeat("r", 200))
		fmt.Fprintf(w, "ok %s %s", r.URL.Path, body)
	}))
	m := NewMetrics(prometheus.NewRegistry())
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", ResponseTimeout: relayTestTimeout, Metrics: m})
	addr := startProxy(t, h, false).addr
	c, dials := newClient(t, pki, addr, true, "")

	if code, body := getStatus(t, c, url+"/before"); code != http.StatusOK || body != "ok /before " {
		t.Fatalf("before: %d %q", code, body)
	}
	code, body := getStatus(t, c, url+"/slow")
	if code != http.StatusGatewayTimeout || body != "gateway timeout\n" {
		t.Fatalf("slow: %d %q, want 504 %q", code, body, "gateway timeout\n")
	}
	recv(t, cancelled, "the backend's request context to be cancelled")
	if n := backendErrors(m, kindTimeout); n != 1 {
		t.Errorf("timeout errors = %v, want 1", n)
	}

	// Same connection: HPACK state and flow control are intact.
	for i := range 5 {
		path := fmt.Sprintf("/after/%d", i)
		res, err := c.Post(url+path, "text/plain", strings.NewReader(strings.Repeat("b", 1000*i)))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if want := fmt.Sprintf("ok %s %s", path, strings.Repeat("b", 1000*i)); res.StatusCode != http.StatusOK || string(b) != want ||
			res.Header.Get("X-Path") != path || res.Header.Get("X-Repeat") != strings.Repeat("r", 200) {
			t.Fatalf("%s: %d %q X-Path %q", path, res.StatusCode, b, res.Header.Get("X-Path"))
		}
	}
	if d := dials.count(); d != 1 {
		t.Errorf("client made %d connections, want 1", d)
	}
	testnet.WaitFor(t, "requests counted", func() bool {
		return routeCounter(m, "5xx") == 1 && routeCounter(m, "2xx") == 6 && activeStreams(m) == 0
	})
}

// 3b. After a 504 the backend answers anyway: the relay drops the late
// response (and gives its window back to the backend) and keeps HPACK in
// step.
func TestRelayTimeoutDropsLateResponse(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	rst := make(chan http2.ErrCode, 1)
	credited := make(chan []uint32, 1)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		s1 := p.stream(1)
		if p.waitCond(func() bool { return s1.rst != nil }) != nil {
			return
		}
		rst <- *s1.rst
		// The late answer adds an entry to the backend's HPACK table.
		late := fields(":status", "200", "x-late", "late-value-1", "content-type", "text/late")
		if p.writeHeaders(1, false, late) != nil || p.sendData(1, make([]byte, 1000), 1000, nil, true) != nil {
			return
		}
		if p.waitCond(func() bool { return len(p.connWU) > 0 }) != nil {
			return
		}
		credited <- p.connWU
		s3 := p.stream(3)
		if p.waitCond(func() bool { return s3.ended }) != nil {
			return
		}
		if p.writeHeaders(3, false, late) != nil || p.sendData(3, []byte("fresh"), 100, nil, true) != nil {
			return
		}
		for p.step() == nil {
		}
	})
	m := NewMetrics(prometheus.NewRegistry())
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c", ResponseTimeout: relayTestTimeout, Metrics: m})

	p.get(1, "/slow")
	s1 := p.response(1)
	if s1.status() != "504" || s1.body.String() != "gateway timeout\n" || !s1.ended {
		t.Fatalf("stream 1: status %s body %q ended %v; want 504 %q", s1.status(), s1.body.String(), s1.ended, "gateway timeout\n")
	}
	if code := recv(t, rst, "RST_STREAM at the backend"); code != http2.ErrCodeCancel {
		t.Errorf("backend got RST_STREAM %v, want CANCEL", code)
	}
	// The client sends nothing meanwhile, so only the relay itself can
	// flush the credit for the dropped DATA.
	select {
	case wu := <-credited:
		if len(wu) != 1 || wu[0] != 1000 {
			t.Errorf("backend got connection WINDOW_UPDATEs %v, want [1000] for the dropped DATA", wu)
		}
	case <-time.After(rawWait):
		t.Errorf("backend got no WINDOW_UPDATE for the 1000 bytes of late DATA the relay dropped, within %v", rawWait)
	}

	p.get(3, "/next")
	s3 := p.response(3)
	if s3.status() != "200" || fieldValue(s3.header, "x-late") != "late-value-1" || s3.body.String() != "fresh" {
		t.Fatalf("stream 3: status %s x-late %q body %q; frames: %s", s3.status(), fieldValue(s3.header, "x-late"), s3.body.String(), p.history())
	}
	if s1.late != 0 || s1.body.String() != "gateway timeout\n" {
		t.Errorf("the late response reached the client: %d frames on stream 1 after its 504; frames: %s", s1.late, p.history())
	}
	if n := backendErrors(m, kindTimeout); n != 1 {
		t.Errorf("timeout errors = %v, want 1", n)
	}
}

// 3c. The relay's own 504 body takes from the client's connection window:
// backend DATA that would overrun it is held until the client gives window
// back (and everything before it is delivered meanwhile), and those bytes
// are not passed on to the backend.
func TestRelayOwnBodyKeepsClientWindow(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	const frame = 4096
	body := randomBytes(3, 65535)
	firstWU := make(chan uint32, 1)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		if p.waitCond(func() bool { return p.stream(1).rst != nil && p.stream(3).ended }) != nil {
			return
		}
		if p.writeHeaders(3, false, fields(":status", "200")) != nil {
			return
		}
		// Exactly the window the backend was given, 65535 bytes, in
		// small frames sent in one write, so that the relay reads many
		// at a time.
		if p.writeDataInFrames(3, body, frame) != nil {
			return
		}
		if p.waitCond(func() bool { return len(p.connWU) > 0 }) != nil {
			return
		}
		firstWU <- p.connWU[0]
		for p.step() == nil {
		}
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c", ResponseTimeout: relayTestTimeout}) // a 65535-byte window, never raised until said

	p.get(1, "/slow")
	s1 := p.response(1)
	own := s1.flow
	if s1.status() != "504" || own != int64(len("gateway timeout\n")) {
		t.Fatalf("stream 1: %s with %d bytes of body", s1.status(), own)
	}
	p.get(3, "/big")
	s3 := p.stream(3)
	// All the frames that fit in what is left of the window (15 of 4096
	// bytes; the 16th would overrun it by 16 bytes) must arrive without
	// the client doing anything.
	fit := (65535 - own) / frame * frame
	if err := p.waitCond(func() bool { return int64(s3.body.Len()) >= fit }); err != nil {
		t.Fatalf("got %d of the %d bytes of stream 3 that fit the client's window: %v; frames: %s", s3.body.Len(), fit, err, p.history())
	}
	// A barrier only the relay takes part in: it answers CONNECT itself.
	p.must(p.writeHeaders(5, true, fields(":method", "CONNECT", ":authority", frontName+":443")))
	s5 := p.response(5)
	if s5.status() != "405" {
		t.Fatalf("CONNECT: %s", s5.status())
	}
	if got := int64(s3.body.Len()); got != fit || p.recvConn > 65535 {
		t.Fatalf("before any WINDOW_UPDATE the client got %d bytes on stream 3 (want %d) and %d in all; window 65535", got, fit, p.recvConn)
	}

	// Window for the relay's own bodies releases the held frame.
	own += s5.flow
	p.must(p.write(func() error { return p.fr.WriteWindowUpdate(0, uint32(own)) }))
	p.until("the end of stream 3", func() bool { return s3.ended })
	if !bytes.Equal(s3.body.Bytes(), body) || p.recvConn > 65535+own {
		t.Fatalf("stream 3: %d bytes (intact %v), %d received in all with %d of window",
			s3.body.Len(), bytes.Equal(s3.body.Bytes(), body), p.recvConn, 65535+own)
	}
	// Window for the backend's bytes goes to the backend, and nothing else.
	p.must(p.write(func() error { return p.fr.WriteWindowUpdate(0, 65535) }))
	if wu := recv(t, firstWU, "a WINDOW_UPDATE at the backend"); wu != 65535 {
		t.Errorf("backend's first connection WINDOW_UPDATE: +%d, want +65535", wu)
	}
}

// 4. The client cancels requests: the backend's request context ends,
// and the connection goes on.
func TestRelayClientCancel(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	started := make(chan struct{}, 1)
	ended := make(chan string, 2)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/stream":
			io.WriteString(w, "first\n")
			http.NewResponseController(w).Flush()
			<-r.Context().Done()
			ended <- "stream"
		case "/wait":
			started <- struct{}{}
			<-r.Context().Done()
			ended <- "wait"
		default:
			io.WriteString(w, "ok")
		}
	}))
	m := NewMetrics(prometheus.NewRegistry())
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", Metrics: m})
	addr := startProxy(t, h, false).addr
	c, dials := newClient(t, pki, addr, true, "")

	// While the backend streams.
	ctx, cancel := context.WithCancel(context.Background())
	res, err := c.Do(mustRequest(t, "GET", url+"/stream", nil).WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(res.Body).ReadString('\n')
	if err != nil || line != "first\n" {
		t.Fatalf("first chunk %q, %v", line, err)
	}
	cancel()
	res.Body.Close()
	if got := recv(t, ended, "the streaming handler's context to end"); got != "stream" {
		t.Fatalf("ended %q", got)
	}

	// While the backend has not answered yet.
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		res, err := c.Do(mustRequest(t, "GET", url+"/wait", nil).WithContext(ctx))
		if err == nil {
			res.Body.Close()
		}
		errc <- err
	}()
	recv(t, started, "the waiting handler")
	cancel()
	if err := recv(t, errc, "the cancelled request"); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled request: %v", err)
	}
	if got := recv(t, ended, "the waiting handler's context to end"); got != "wait" {
		t.Fatalf("ended %q", got)
	}

	for range 3 {
		if code, body := getStatus(t, c, url+"/"); code != http.StatusOK || body != "ok" {
			t.Fatalf("after cancels: %d %q", code, body)
		}
	}
	if d := dials.count(); d != 1 {
		t.Errorf("client made %d connections, want 1", d)
	}
	// The stream cancelled after its headers counts as 2xx, the one
	// cancelled before as a client that left (4xx).
	testnet.WaitFor(t, "requests counted", func() bool {
		return routeCounter(m, "2xx") == 4 && routeCounter(m, "4xx") == 1 && activeStreams(m) == 0
	})
}

// chanListener hands out the connections sent on its channel.
type chanListener struct {
	addr  net.Addr
	conns chan net.Conn
	once  sync.Once
	done  chan struct{}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// goAwaySniffer closes goAway once a GOAWAY frame has been written to the
// connection (the server side of h2c, which writes nothing but frames).
type goAwaySniffer struct {
	net.Conn
	mu     sync.Mutex
	hdr    []byte
	skip   int
	seen   bool
	goAway chan struct{}
}

func (s *goAwaySniffer) Write(b []byte) (int, error) {
	n, err := s.Conn.Write(b)
	s.mu.Lock()
	defer s.mu.Unlock()
	for q := b[:n]; len(q) > 0; {
		if s.skip > 0 {
			k := min(s.skip, len(q))
			s.skip -= k
			q = q[k:]
			continue
		}
		k := min(9-len(s.hdr), len(q))
		s.hdr = append(s.hdr, q[:k]...)
		q = q[k:]
		if len(s.hdr) == 9 {
			s.skip = int(s.hdr[0])<<16 | int(s.hdr[1])<<8 | int(s.hdr[2])
			if http2.FrameType(s.hdr[3]) == http2.FrameGoAway && !s.seen {
				s.seen = true
				close(s.goAway)
			}
			s.hdr = s.hdr[:0]
		}
	}
	return n, err
}

// 5. The backend shuts down gracefully (GOAWAY) while a request is in
// flight: it completes, and later requests go over a new connection.
func TestRelayBackendGoAway(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	started := make(chan struct{}, 1)
	release, releaseNow := releaser(t)
	handler := holdOn("/first", "first", started, release)

	// The first backend connection goes to srvA, which is shut down;
	// every later one to srvB.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lnA := &chanListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})}
	lnB := &chanListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})}
	sniffer := &goAwaySniffer{goAway: make(chan struct{})}
	newServer := func() *http.Server {
		s := &http.Server{Handler: handler, Protocols: new(http.Protocols), ErrorLog: nopLogger()}
		s.Protocols.SetHTTP1(true)
		s.Protocols.SetUnencryptedHTTP2(true)
		return s
	}
	srvA, srvB := newServer(), newServer()
	var wg sync.WaitGroup
	wg.Go(func() {
		first := true
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			to := lnB
			if first {
				first = false
				sniffer.Conn = c
				c, to = sniffer, lnA
			}
			select {
			case to.conns <- c:
			case <-to.done:
				c.Close()
			}
		}
	})
	wg.Go(func() { srvA.Serve(lnA) })
	wg.Go(func() { srvB.Serve(lnB) })
	t.Cleanup(func() {
		ln.Close()
		srvA.Close()
		srvB.Close()
		wg.Wait()
	})

	h := newTestHandler(t, pki, Options{Backend: ln.Addr().String(), Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	c, dials := newClient(t, pki, addr, true, "")

	first := getAsync(c, url+"/first")
	recv(t, started, "the first request at the backend")
	shutdown := make(chan error, 1)
	go func() { shutdown <- srvA.Shutdown(context.Background()) }()
	recv(t, sniffer.goAway, "the backend's GOAWAY")
	releaseNow()

	if r := recv(t, first, "the in-flight request"); r.err != nil || r.code != http.StatusOK || r.body != "first" {
		t.Fatalf("in-flight request: %d %q %v; want 200 first", r.code, r.body, r.err)
	}
	for range 3 {
		if code, body := getStatus(t, c, url+"/second"); code != http.StatusOK || body != "ok" {
			t.Fatalf("after GOAWAY: %d %q", code, body)
		}
	}
	if d := dials.count(); d != 2 {
		t.Errorf("client made %d connections, want 2 (the first one went away)", d)
	}
	// The relay closed the backend connection that went away.
	if err := recv(t, shutdown, "the backend's Shutdown to finish"); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

// 5b. A backend's graceful shutdown may begin with a GOAWAY naming the
// highest stream ID there is (grpc-go's GracefulStop and
// MaxConnectionAge, Envoy's drain): "streams on their way will still be
// served", the real last stream following in a second GOAWAY. The relay
// closes the connection as soon as no stream is left, before that second
// one, so it must tell the client itself which streams reached the
// backend: a request the client sent meanwhile is then retried on a new
// connection instead of failing as one the backend may have processed.
func TestRelayBackendGoAwayNotice(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			p.writeHeaders(id, false, fields(":status", "200"))
			p.sendData(id, []byte("ok"), 100, nil, true)
			if id == 1 {
				p.write(func() error { return p.fr.WriteGoAway(1<<31-1, http2.ErrCodeNo, nil) })
			}
		})
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c"})

	p.get(1, "/")
	if s := p.response(1); s.status() != "200" {
		t.Fatalf("stream 1: %s; frames: %s", s.status(), p.history())
	}
	p.until("the backend's GOAWAY", func() bool { return p.goAway != nil })
	p.get(3, "/")
	p.until("the connection to close", func() bool { return p.readErr != nil })

	if p.goAway.last != 1 {
		t.Errorf("last GOAWAY %+v before the close, want last stream 1 (the backend got no other); frames: %s", *p.goAway, p.history())
	}
	if s := p.stream(3); s.status() != "200" && !(s.rst != nil && *s.rst == http2.ErrCodeRefusedStream) && p.goAway.last >= 3 {
		t.Errorf("stream 3 was neither answered nor refused, and the last GOAWAY (last stream %d) says the backend may have processed it; frames: %s",
			p.goAway.last, p.history())
	}
}

// 6. The backend connection dies with a request waiting for its response:
// 502, then GOAWAY, then the client connection is closed.
func TestRelayBackendConnectionDies(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		if p.waitCond(func() bool { return p.stream(1).header != nil }) == nil {
			p.conn.Close()
		}
	})
	m := NewMetrics(prometheus.NewRegistry())
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c", Metrics: m})

	p.get(1, "/doomed")
	s := p.response(1)
	if s.status() != "502" || s.body.String() != "bad gateway\n" || !s.ended {
		t.Fatalf("status %s body %q ended %v; want 502 %q", s.status(), s.body.String(), s.ended, "bad gateway\n")
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
	if p.goAway == nil || p.goAway.last != 1 || p.goAway.code != http2.ErrCodeNo {
		t.Fatalf("GOAWAY %+v, want last stream 1, NO_ERROR; frames: %s", p.goAway, p.history())
	}
	if end, ga := p.eventIndex("DATA 1 len=12 end=true"), p.eventIndex("GOAWAY"); end < 0 || ga < end {
		t.Errorf("want the 502 before the GOAWAY; frames: %s", p.history())
	}
	if !errors.Is(p.readErr, io.EOF) {
		t.Errorf("after GOAWAY: %v, want EOF", p.readErr)
	}
	if n := backendErrors(m, kindOther); n != 1 {
		t.Errorf("backend errors (other) = %v, want 1", n)
	}
	testnet.WaitFor(t, "5xx counted", func() bool { return routeCounter(m, "5xx") == 1 && activeStreams(m) == 0 })
}

// 6b. Every request cut off by a dead backend connection is a backend
// error, as on the general path (one RoundTrip error each).
func TestRelayBackendDiesCountsEveryRequest(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		if p.waitCond(func() bool { return p.stream(1).header != nil && p.stream(3).header != nil }) == nil {
			p.conn.Close()
		}
	})
	m := NewMetrics(prometheus.NewRegistry())
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c", Metrics: m})

	p.get(1, "/a")
	p.get(3, "/b")
	for _, id := range []uint32{1, 3} {
		if s := p.response(id); s.status() != "502" || s.body.String() != "bad gateway\n" {
			t.Errorf("stream %d: %s %q, want 502", id, s.status(), s.body.String())
		}
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
	if p.goAway == nil || p.goAway.last != 3 {
		t.Errorf("GOAWAY %+v, want last stream 3", p.goAway)
	}
	testnet.WaitFor(t, "5xx counted", func() bool { return routeCounter(m, "5xx") == 2 && activeStreams(m) == 0 })
	if n := backendErrors(m, kindOther); n != 2 {
		t.Errorf("portcullis_l7_backend_errors_total{kind=other} = %v after two requests got 502, want 2", n)
	}
}

// 7. MAX_CONCURRENT_STREAMS: the backend's limit reaches the client, the
// relay refuses a stream above it, and a Go client stays within it.
func TestRelayMaxConcurrentStreams(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)

	t.Run("raw", func(t *testing.T) {
		arrived := make(chan struct{})
		release, releaseNow := releaser(t)
		var mu sync.Mutex
		seen := map[uint32]bool{}
		addr := startRawBackend(t, nil, []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 2}}, func(p *h2Peer) {
			if p.waitCond(func() bool { return p.stream(1).ended && p.stream(3).ended }) != nil {
				return
			}
			close(arrived)
			<-release
			p.serveRequests(func(id uint32, s *h2Stream) {
				mu.Lock()
				seen[id] = true
				mu.Unlock()
				p.writeHeaders(id, false, fields(":status", "200"))
				p.sendData(id, []byte("ok"), 100, nil, true)
			})
		})
		h := newTestHandler(t, pki, Options{Backend: addr, Protocol: "h2c"})
		paddr := startProxy(t, h, false).addr
		p := dialRaw(t, pki, paddr)
		if got, ok := p.settings[http2.SettingMaxConcurrentStreams]; !ok || got != 2 {
			t.Fatalf("client got MAX_CONCURRENT_STREAMS %d (present %v), want 2", got, ok)
		}

		p.get(1, "/a")
		p.get(3, "/b")
		recv(t, arrived, "two streams at the backend")
		p.get(5, "/c")
		s5 := p.stream(5)
		// The backend is quiet now: the refusal must reach the client
		// on its own.
		if err := p.waitCond(s5.done); err != nil {
			t.Errorf("third concurrent stream: no RST_STREAM while the other two were open (%v); frames: %s", err, p.history())
		}
		releaseNow()
		for _, id := range []uint32{1, 3} {
			if s := p.response(id); s.status() != "200" || s.body.String() != "ok" {
				t.Errorf("stream %d: %s %q", id, s.status(), s.body.String())
			}
		}
		p.response(5)
		if s5.rst == nil || *s5.rst != http2.ErrCodeRefusedStream || s5.header != nil {
			t.Errorf("stream 5: rst %v header %v, want RST_STREAM REFUSED_STREAM only", s5.rst, s5.header)
		}
		p.ping("barrier!")
		mu.Lock()
		if seen[5] {
			t.Error("the refused stream reached the backend")
		}
		mu.Unlock()
		p.get(7, "/d")
		if s := p.response(7); s.status() != "200" {
			t.Errorf("stream 7 after the refusal: %s", s.status())
		}
	})

	t.Run("go client", func(t *testing.T) {
		be := startH2CBackend(t, &http.HTTP2Config{MaxConcurrentStreams: 2}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// Hold each request a moment so that they overlap; nothing
			// depends on how long.
			time.Sleep(5 * time.Millisecond)
			fmt.Fprintf(w, "ok %s", r.URL.Path)
		}))
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
		addr := startProxy(t, h, false).addr
		c, _ := newClient(t, pki, addr, true, "")
		if code, _ := getStatus(t, c, url+"/warmup"); code != http.StatusOK {
			t.Fatalf("warmup: %d", code)
		}
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Go(func() {
				path := fmt.Sprintf("/r/%d", i)
				res, err := c.Get(url + path)
				if err != nil {
					t.Errorf("%s: %v", path, err)
					return
				}
				b, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if res.StatusCode != http.StatusOK || string(b) != "ok "+path {
					t.Errorf("%s: %d %q", path, res.StatusCode, b)
				}
			})
		}
		wg.Wait()
	})
}

// 8. Request header checks the relay makes itself.
func TestRelayRequestHeaderLimits(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, echo)
	m := NewMetrics(prometheus.NewRegistry())
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", Metrics: m})
	addr := startProxy(t, h, false).addr

	// open returns a raw connection that has completed one request, so
	// that nothing from the backend is still on its way.
	open := func(t *testing.T) *h2Peer {
		p := dialRaw(t, pki, addr)
		p.get(1, "/warmup")
		if s := p.response(1); s.status() != "200" {
			t.Fatalf("warmup: %s", s.status())
		}
		return p
	}
	// after checks that the connection still works, HPACK included.
	after := func(t *testing.T, p *h2Peer, kv ...string) echoReply {
		t.Helper()
		p.get(5, "/after", kv...)
		s := p.response(5)
		var rep echoReply
		if s.status() != "200" || json.Unmarshal(s.body.Bytes(), &rep) != nil {
			t.Fatalf("request after: %s %q; frames: %s", s.status(), s.body.String(), p.history())
		}
		return rep
	}

	t.Run("header list too large", func(t *testing.T) {
		p := open(t)
		value := func(i int) string { return strings.Repeat(string(rune('a'+i%26)), 1000) }
		var first, rest []hpack.HeaderField
		first = reqFields("GET", "/big")
		for i := range 70 {
			f := hpack.HeaderField{Name: fmt.Sprintf("x-big-%02d", i), Value: value(i)}
			if i < 60 {
				first = append(first, f)
			} else {
				rest = append(rest, f)
			}
		}
		// 60 fields stay under the 64 KiB list limit; the last
		// CONTINUATION takes the list over it (the framer closes the
		// connection if more fragments follow once it is over).
		frags := append(splitBytes(p.encode(first), 16384), p.encode(rest))
		p.must(p.writeFragments(3, true, frags...))
		s := p.response(3)
		if s.status() != "431" || s.body.String() != "request header fields too large\n" {
			t.Fatalf("status %s body %q, want 431; frames: %s", s.status(), s.body.String(), p.history())
		}
		if rep := after(t, p, "x-big-69", value(69)); rep.Header.Get("X-Big-69") != value(69) {
			t.Errorf("header after the 431 arrived as %q", rep.Header.Get("X-Big-69"))
		}
	})

	t.Run("CONNECT", func(t *testing.T) {
		p := open(t)
		p.must(p.writeHeaders(3, true, fields(":method", "CONNECT", ":authority", "elsewhere.test:443")))
		s := p.response(3)
		if s.status() != "405" || s.body.String() != "method not allowed\n" || s.rst != nil {
			t.Fatalf("status %s body %q rst %v, want 405 and no reset", s.status(), s.body.String(), s.rst)
		}
		after(t, p)
	})

	t.Run("connection header", func(t *testing.T) {
		p := open(t)
		p.get(3, "/hop", "connection", "keep-alive")
		s := p.stream(3)
		// Nothing else is in flight: the reset must come on its own.
		if err := p.waitCond(s.done); err != nil {
			t.Errorf("no RST_STREAM for a request with a connection header (%v); frames: %s", err, p.history())
		}
		after(t, p)
		if s.rst == nil || *s.rst != http2.ErrCodeProtocol || s.header != nil {
			t.Errorf("stream 3: rst %v header %v, want RST_STREAM PROTOCOL_ERROR only", s.rst, s.header)
		}
	})

	testnet.WaitFor(t, "4xx counted", func() bool { return routeCounter(m, "4xx") == 2 && activeStreams(m) == 0 })
}

// 8b. Request DATA the relay drops, for a stream it answered itself, is
// credited back to the client; an unfinished request is reset after the
// answer.
func TestRelayCreditsDroppedRequestData(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, echo)
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr)
	p.get(1, "/warmup")
	p.response(1)

	p.must(p.writeHeaders(3, false, fields(":method", "CONNECT", ":authority", "elsewhere.test:443")))
	p.must(p.sendData(3, make([]byte, 1000), 1000, nil, true))
	s := p.stream(3)
	p.until("the 405", func() bool { return s.ended })
	if s.status() != "405" {
		t.Fatalf("CONNECT: %s", s.status())
	}
	credit := func() bool { return slices.Contains(p.connWU, 1000) }
	if err := p.waitCond(func() bool { return s.rst != nil && credit() }); err != nil {
		t.Errorf("waiting for RST_STREAM and a WINDOW_UPDATE of 1000 for the dropped DATA: %v; frames: %s", err, p.history())
	}
	p.get(5, "/after")
	if s := p.response(5); s.status() != "200" {
		t.Fatalf("after: %s", s.status())
	}
	if s.rst == nil || *s.rst != http2.ErrCodeNo {
		t.Errorf("stream 3: rst %v, want RST_STREAM NO_ERROR after the answer", s.rst)
	}
	if !credit() {
		t.Errorf("no WINDOW_UPDATE crediting the 1000 dropped bytes; frames: %s", p.history())
	}
}

// 8c. When the relay answers (504) a request whose body is still coming,
// it resets the stream (RFC 9113 section 8.1) so that the client stops
// sending.
func TestRelayAnswerResetsUnfinishedRequest(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			<-r.Context().Done()
			return
		}
		io.WriteString(w, "ok")
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", ResponseTimeout: relayTestTimeout})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr)

	p.must(p.writeHeaders(1, false, reqFields("POST", "/slow")))
	p.must(p.sendData(1, make([]byte, 100), 100, nil, false))
	s := p.response(1)
	if s.status() != "504" || s.body.String() != "gateway timeout\n" {
		t.Fatalf("status %s body %q, want 504", s.status(), s.body.String())
	}
	// answer writes the reset with the response, so it precedes the
	// PING's answer from the backend.
	p.ping("barrier!")
	if s.rst == nil || *s.rst != http2.ErrCodeNo {
		t.Errorf("504 for a request still sending its body, but no RST_STREAM(NO_ERROR) (rst %v); frames: %s", s.rst, p.history())
	}
	p.get(3, "/")
	if s := p.response(3); s.status() != "200" || s.body.String() != "ok" {
		t.Fatalf("after: %s %q", s.status(), s.body.String())
	}
}

// 9. Large header blocks both ways, split into CONTINUATIONs at each
// peer's frame size; a client without an HPACK table.
func TestRelayLargeHeaders(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	value := func(kind string, i int) string { return strings.Repeat(string(rune('a'+i%26)), 1000) + kind }
	be := startH2CBackend(t, &http.HTTP2Config{MaxReadFrameSize: 16384}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/small" {
			// Small enough to stay in a dynamic table between responses.
			w.Header().Set("X-Small", "same")
			w.Header().Set("X-Other", "also the same")
			io.WriteString(w, "small")
			return
		}
		n := 0
		for i := range 40 {
			if r.Header.Get(fmt.Sprintf("X-Req-%02d", i)) == value("req", i) {
				n++
			}
		}
		for i := range 40 {
			w.Header().Set(fmt.Sprintf("X-Res-%02d", i), value("res", i))
		}
		w.Header().Set("X-Small", "same")
		fmt.Fprintf(w, "ok %d", n)
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	var reqHeaders []string
	for i := range 40 {
		reqHeaders = append(reqHeaders, fmt.Sprintf("x-req-%02d", i), value("req", i))
	}

	t.Run("raw, header table 0", func(t *testing.T) {
		// The client's decoder has no dynamic table; the relay's encoder
		// must not use one.
		p := dialRaw(t, pki, addr, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
		for i := range 3 {
			id := uint32(2*i + 1)
			p.get(id, fmt.Sprintf("/large/%d", i), reqHeaders...)
			s := p.response(id)
			if s.status() != "200" || s.body.String() != "ok 40" {
				t.Fatalf("request %d: %s %q", i, s.status(), s.body.String())
			}
			for j := range 40 {
				if got := fieldValue(s.header, fmt.Sprintf("x-res-%02d", j)); got != value("res", j) {
					t.Fatalf("request %d: x-res-%02d has %d bytes, want %d", i, j, len(got), len(value("res", j)))
				}
			}
			if got := fieldValues(s.header, "x-small"); len(got) != 1 || got[0] != "same" {
				t.Fatalf("request %d: x-small %q", i, got)
			}
		}
		// Repeated small responses: an encoder with a dynamic table
		// would refer back to the first one's fields.
		for _, id := range []uint32{7, 9, 11} {
			p.get(id, "/small")
			s := p.response(id)
			if s.status() != "200" || fieldValue(s.header, "x-small") != "same" || fieldValue(s.header, "x-other") != "also the same" {
				t.Fatalf("stream %d: %s %v", id, s.status(), s.header)
			}
		}
	})

	t.Run("go client", func(t *testing.T) {
		c, _ := newClient(t, pki, addr, true, "")
		for i := range 3 {
			req := mustRequest(t, "GET", fmt.Sprintf("%s/large/%d", url, i), nil)
			for j := range 40 {
				req.Header.Set(fmt.Sprintf("X-Req-%02d", j), value("req", j))
			}
			res, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusOK || string(b) != "ok 40" {
				t.Fatalf("request %d: %d %q", i, res.StatusCode, b)
			}
			for j := range 40 {
				if got := res.Header.Get(fmt.Sprintf("X-Res-%02d", j)); got != value("res", j) {
					t.Fatalf("request %d: X-Res-%02d has %d bytes", i, j, len(got))
				}
			}
		}
	})
}

// 10. Request and response trailers pass through.
func TestRelayTrailers(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Trailer", "X-Res-Trailer")
		w.WriteHeader(http.StatusOK)
		fmt.Fprintf(w, "got %q, trailer %q", body, r.Trailer.Get("X-Req-Trailer"))
		w.Header().Set("X-Res-Trailer", "res-"+r.Trailer.Get("X-Req-Trailer"))
		w.Header().Set(http.TrailerPrefix+"X-Undeclared", "late")
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	c, dials := newClient(t, pki, addr, true, "")

	for i := range 3 {
		val := fmt.Sprintf("value-%d", i)
		// A body of unknown length, then the trailer.
		req := mustRequest(t, "POST", url+"/trailers", io.NopCloser(strings.NewReader("hello")))
		req.Trailer = http.Header{"X-Req-Trailer": {val}}
		res, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("got %q, trailer %q", "hello", val); string(b) != want {
			t.Errorf("backend reported %q, want %q", b, want)
		}
		if got := res.Trailer.Get("X-Res-Trailer"); got != "res-"+val {
			t.Errorf("response trailer X-Res-Trailer = %q, want %q", got, "res-"+val)
		}
		if got := res.Trailer.Get("X-Undeclared"); got != "late" {
			t.Errorf("response trailer X-Undeclared = %q, want late", got)
		}
	}
	if d := dials.count(); d != 1 {
		t.Errorf("client made %d connections, want 1", d)
	}
}

// 11. An idle relayed connection gets GOAWAY and is closed, and its
// backend connection with it.
func TestRelayIdleTimeout(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, echo)
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", IdleTimeout: 300 * time.Millisecond})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr)
	p.get(1, "/")
	if s := p.response(1); s.status() != "200" {
		t.Fatalf("status %s", s.status())
	}
	p.until("the idle connection to close", func() bool { return p.readErr != nil })
	if p.goAway == nil || p.goAway.last != 1 || p.goAway.code != http2.ErrCodeNo {
		t.Fatalf("GOAWAY %+v before the close, want last stream 1, NO_ERROR; frames: %s", p.goAway, p.history())
	}
	if !errors.Is(p.readErr, io.EOF) {
		t.Errorf("after GOAWAY: %v, want EOF", p.readErr)
	}
	testnet.WaitFor(t, "the backend connection to close", func() bool { return be.open.Load() == 0 })
}

// 12. Forwarding headers on the relay path, as the backend receives them.
func TestRelayForwardingHeaders(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	reqs := make(chan []hpack.HeaderField, 1)
	serve := func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			reqs <- s.header
			p.writeHeaders(id, true, fields(":status", "204"))
		})
	}
	h2cAddr := startRawBackend(t, nil, nil, serve)
	tlsAddr := startRawBackend(t, &tls.Config{Certificates: []tls.Certificate{pki.keyPair(t, "127.0.0.1")}, NextProtos: []string{"h2"}}, nil, serve)

	spoof := func(req *http.Request) {
		req.Header.Add("X-Forwarded-For", "203.0.113.9")
		req.Header.Add("X-Forwarded-For", "198.51.100.7")
		req.Header.Set("X-Real-IP", "203.0.113.9")
		req.Header.Set("Forwarded", "for=203.0.113.9")
		req.Header.Set("X-Forwarded-Host", "evil.test")
		req.Header.Set("X-Forwarded-Proto", "http")
		req.Header.Set("Proxy-Authorization", "Basic c2VjcmV0")
	}
	tests := []struct {
		name      string
		protocol  string
		trust     bool
		spoof     bool
		xff, real string
		forwarded []string
		scheme    string
	}{
		{"untrusted", "h2c", false, false, "127.0.0.1", "127.0.0.1", nil, "http"},
		{"untrusted spoofed", "h2c", false, true, "127.0.0.1", "127.0.0.1", nil, "http"},
		{"trusted", "h2c", true, false, "127.0.0.1", "127.0.0.1", nil, "http"},
		{"trusted chain", "h2c", true, true, "203.0.113.9, 198.51.100.7, 127.0.0.1", "203.0.113.9", []string{"for=203.0.113.9"}, "http"},
		{"h2 backend", "h2", false, true, "127.0.0.1", "127.0.0.1", nil, "https"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := Options{Backend: h2cAddr, Protocol: tt.protocol}
			if tt.protocol == "h2" {
				o.Backend, o.BackendCAFile = tlsAddr, pki.caFile
			}
			h := newTestHandler(t, pki, o)
			addr := startProxy(t, h, tt.trust).addr
			c, _ := newClient(t, pki, addr, true, "")
			req := mustRequest(t, "GET", url+"/path?q=1", nil)
			if tt.spoof {
				spoof(req)
			}
			res, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			if res.StatusCode != http.StatusNoContent || res.Proto != "HTTP/2.0" {
				t.Fatalf("%s %d", res.Proto, res.StatusCode)
			}
			got := recv(t, reqs, "the request at the backend")
			want := map[string][]string{
				":scheme":             {tt.scheme},
				":authority":          {frontName},
				":path":               {"/path?q=1"},
				":method":             {"GET"},
				"x-forwarded-for":     {tt.xff},
				"x-real-ip":           {tt.real},
				"forwarded":           tt.forwarded,
				"x-forwarded-proto":   {"https"},
				"x-forwarded-host":    {frontName},
				"proxy-authorization": nil,
			}
			for name, w := range want {
				if g := fieldValues(got, name); !slices.Equal(g, w) {
					t.Errorf("%s = %q, want %q", name, g, w)
				}
			}
		})
	}
}

// 13. Request metrics on the relay path.
func TestRelayRequestMetrics(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	held := make(chan struct{}, 1)
	release, releaseNow := releaser(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/missing":
			http.NotFound(w, r)
		case "/hold":
			held <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
			}
			io.WriteString(w, "held")
		default:
			io.WriteString(w, "ok")
		}
	}))
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", Metrics: m})
	addr := startProxy(t, h, false).addr
	c, _ := newClient(t, pki, addr, true, "")

	for range 3 {
		if code, _ := getStatus(t, c, url+"/"); code != http.StatusOK {
			t.Fatalf("status %d", code)
		}
	}
	if code, _ := getStatus(t, c, url+"/missing"); code != http.StatusNotFound {
		t.Fatalf("missing: %d", code)
	}
	done := make(chan int, 1)
	go func() {
		res, err := c.Get(url + "/hold")
		if err != nil {
			done <- 0
			return
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		done <- res.StatusCode
	}()
	recv(t, held, "the held request")
	testnet.WaitFor(t, "one active stream", func() bool { return activeStreams(m) == 1 })
	releaseNow()
	if code := recv(t, done, "the held request"); code != http.StatusOK {
		t.Fatalf("held: %d", code)
	}
	testnet.WaitFor(t, "requests counted", func() bool {
		return routeCounter(m, "2xx") == 4 && routeCounter(m, "4xx") == 1 && activeStreams(m) == 0
	})
	if n := routeCounter(m, "5xx"); n != 0 {
		t.Errorf("5xx = %v", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var observed uint64
	for _, mf := range mfs {
		if mf.GetName() == "portcullis_l7_request_duration_seconds" {
			for _, mm := range mf.GetMetric() {
				observed += mm.GetHistogram().GetSampleCount()
			}
		}
	}
	if observed != 5 {
		t.Errorf("request durations observed: %d, want 5", observed)
	}
}

// A backend that pushes is not possible: the relay forwards no pushes, so
// it must tell the backend ENABLE_PUSH = 0 even when the client did not
// send that setting (its default is 1).
func TestRelayBackendPushDisabled(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	pushErr := make(chan error, 1)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/page" {
			if pusher, ok := w.(http.Pusher); ok {
				pushErr <- pusher.Push("/style.css", nil)
			} else {
				pushErr <- errors.New("no http.Pusher")
			}
		}
		io.WriteString(w, "body of "+r.URL.Path)
	}))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, addr) // no SETTINGS_ENABLE_PUSH: RFC 9113's default applies

	p.get(1, "/page")
	s := p.response(1)
	if err := recv(t, pushErr, "the backend's Push"); err == nil {
		t.Errorf("the backend was allowed to push")
	}
	if s.status() != "200" || s.body.String() != "body of /page" || p.goAway != nil || p.pushes != 0 {
		t.Fatalf("status %s body %q, GOAWAY %+v, %d pushes; want 200 and the page; frames: %s",
			s.status(), s.body.String(), p.goAway, p.pushes, p.history())
	}
	p.get(3, "/next")
	if s := p.response(3); s.status() != "200" {
		t.Fatalf("next: %s", s.status())
	}
}

// Malformed response headers from the backend get 502; the connection
// goes on.
func TestRelayMalformedResponseHeaders(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	resets := make(chan [2]*http2.ErrCode, 1)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			switch fieldValue(s.header, ":path") {
			case "/no-status":
				p.writeHeaders(id, true, fields("content-type", "text/plain"))
			case "/bad-name":
				p.writeHeaders(id, true, fields(":status", "200", "X-Upper", "v"))
			default:
				resets <- [2]*http2.ErrCode{p.stream(1).rst, p.stream(3).rst}
				p.writeHeaders(id, false, fields(":status", "200"))
				p.sendData(id, []byte("fine"), 100, nil, true)
			}
		})
	})
	m := NewMetrics(prometheus.NewRegistry())
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c", Metrics: m})

	for _, tc := range []struct {
		id   uint32
		path string
	}{{1, "/no-status"}, {3, "/bad-name"}} {
		p.get(tc.id, tc.path)
		if s := p.response(tc.id); s.status() != "502" || s.body.String() != "bad gateway\n" {
			t.Errorf("%s: %s %q, want 502", tc.path, s.status(), s.body.String())
		}
	}
	p.get(5, "/ok")
	if s := p.response(5); s.status() != "200" || s.body.String() != "fine" {
		t.Fatalf("after: %s %q", s.status(), s.body.String())
	}
	rs := recv(t, resets, "the third request")
	for i, r := range rs {
		if r == nil || *r != http2.ErrCodeProtocol {
			t.Errorf("backend stream %d: reset %v, want PROTOCOL_ERROR", 2*i+1, r)
		}
	}
	if p.goAway != nil {
		t.Errorf("GOAWAY %+v", p.goAway)
	}
	if n := backendErrors(m, kindOther); n != 2 {
		t.Errorf("backend errors (other) = %v, want 2", n)
	}
}

// Drain (ServeConn's context cancelled): GOAWAY naming the stream in
// flight, which completes; then the connection closes.
func TestRelayDrain(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	started := make(chan struct{}, 1)
	release, releaseNow := releaser(t)
	be := startH2CBackend(t, nil, holdOn("/hold", "held", started, release))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	prx := startProxy(t, h, false)
	p := dialRaw(t, pki, prx.addr)
	p.get(1, "/")
	p.response(1)
	p.get(3, "/hold")
	recv(t, started, "the held request")
	prx.cancel()
	p.until("GOAWAY", func() bool { return p.goAway != nil })
	if p.goAway.last != 3 || p.goAway.code != http2.ErrCodeNo {
		t.Errorf("GOAWAY %+v, want last stream 3, NO_ERROR", p.goAway)
	}
	releaseNow()
	if s := p.response(3); s.status() != "200" || s.body.String() != "held" {
		t.Fatalf("in-flight: %s %q", s.status(), s.body.String())
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
	if !errors.Is(p.readErr, io.EOF) {
		t.Errorf("after the last stream: %v, want EOF", p.readErr)
	}
}

// SETTINGS are filtered both ways in the preface and passed on later;
// PINGs and SETTINGS ACKs pass through one for one.
func TestRelaySettingsAndPing(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	type backendView struct {
		preface, later []http2.Setting
		ping           [8]byte
	}
	view := make(chan backendView, 1)
	addr := startRawBackend(t, nil, []http2.Setting{
		{ID: http2.SettingHeaderTableSize, Val: 8192},
		{ID: http2.SettingMaxConcurrentStreams, Val: 7},
		{ID: http2.SettingInitialWindowSize, Val: 50000},
		{ID: http2.SettingMaxFrameSize, Val: 20000},
		{ID: http2.SettingMaxHeaderListSize, Val: 1 << 20},
	}, func(p *h2Peer) {
		if p.waitCond(func() bool { return p.settingsFrames == 2 && len(p.pings) == 1 }) != nil {
			return
		}
		// A SETTINGS of the backend's own, after the preface.
		p.write(func() error {
			return p.fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 5},
				http2.Setting{ID: http2.SettingInitialWindowSize, Val: 60000})
		})
		view <- backendView{p.settingsLog[0], p.settingsLog[1], p.pings[0]}
		p.serveRequests(func(id uint32, s *h2Stream) {
			p.writeHeaders(id, false, fields(":status", "200"))
			p.sendData(id, randomBytes(1, 30000), 20000, nil, true)
		})
	})
	h := newTestHandler(t, pki, Options{Backend: addr, Protocol: "h2c"})
	paddr := startProxy(t, h, false).addr
	p := dialRaw(t, pki, paddr,
		http2.Setting{ID: http2.SettingHeaderTableSize, Val: 1024},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: 100000},
		http2.Setting{ID: http2.SettingMaxFrameSize, Val: 32768},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: 1 << 20})

	toMap := func(ss []http2.Setting) map[http2.SettingID]uint32 {
		m := map[http2.SettingID]uint32{}
		for _, s := range ss {
			m[s.ID] = s.Val
		}
		return m
	}
	check := func(who string, got map[http2.SettingID]uint32, want map[http2.SettingID]uint32) {
		t.Helper()
		for id, v := range want {
			if g, ok := got[id]; !ok && v != 0 || ok && (v == 0 || g != v) {
				t.Errorf("%s: %v = %d (present %v), want %d (0: absent)", who, id, g, ok, v)
			}
		}
	}
	check("client's preface SETTINGS", toMap(p.settingsLog[0]), map[http2.SettingID]uint32{
		http2.SettingHeaderTableSize:      0, // hop by hop
		http2.SettingMaxConcurrentStreams: 7,
		http2.SettingInitialWindowSize:    50000,
		http2.SettingMaxFrameSize:         20000,
		http2.SettingMaxHeaderListSize:    maxHeaderBytes,
	})

	p.ping("relay!!!")
	p.must(p.write(func() error {
		return p.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 70000})
	}))
	p.until("ACKs of both client SETTINGS", func() bool { return p.acks == 2 })
	v := recv(t, view, "the backend's view")
	check("backend's preface SETTINGS", toMap(v.preface), map[http2.SettingID]uint32{
		http2.SettingHeaderTableSize:   0,
		http2.SettingInitialWindowSize: 100000,
		http2.SettingMaxFrameSize:      32768,
		http2.SettingMaxHeaderListSize: 1 << 20,
	})
	check("backend's later SETTINGS", toMap(v.later), map[http2.SettingID]uint32{http2.SettingInitialWindowSize: 70000})
	if string(v.ping[:]) != "relay!!!" {
		t.Errorf("backend got PING %q", v.ping[:])
	}
	p.until("the backend's later SETTINGS", func() bool { return p.settingsFrames == 2 })
	check("client's later SETTINGS", toMap(p.settingsLog[1]), map[http2.SettingID]uint32{
		http2.SettingMaxConcurrentStreams: 5,
		http2.SettingInitialWindowSize:    60000,
	})

	// A response in DATA frames larger than the default frame size, as
	// the client allowed.
	p.autoCredit = true
	p.get(1, "/")
	s := p.response(1)
	if s.status() != "200" || s.body.Len() != 30000 || !bytes.Equal(s.body.Bytes(), randomBytes(1, 30000)) {
		t.Fatalf("status %s, %d bytes", s.status(), s.body.Len())
	}
	if p.eventIndex("DATA 1 len=20000") < 0 {
		t.Errorf("want a 20000-byte DATA frame; frames: %s", p.history())
	}
}

// A GOAWAY never raises the last stream ID of one sent before (RFC 9113
// section 6.8), whoever causes the later one.
func TestRelayGoAwayNeverRaisesLastStream(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	monotonic := func(t *testing.T, p *h2Peer) {
		t.Helper()
		if len(p.goAways) < 2 {
			t.Fatalf("want two GOAWAYs, got %+v; frames: %s", p.goAways, p.history())
		}
		for i := 1; i < len(p.goAways); i++ {
			if p.goAways[i].last > p.goAways[i-1].last {
				t.Errorf("GOAWAY %d raised the last stream ID from %d to %d; frames: %s",
					i+1, p.goAways[i-1].last, p.goAways[i].last, p.history())
			}
		}
	}

	t.Run("backend GOAWAY after drain", func(t *testing.T) {
		arrived := make(chan struct{})
		goAway, goAwayNow := releaser(t)
		addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
			if p.waitCond(func() bool { return p.stream(1).ended }) != nil {
				return
			}
			close(arrived)
			<-goAway
			// A graceful shutdown's first GOAWAY names no stream yet.
			p.write(func() error { return p.fr.WriteGoAway(1<<31-1, http2.ErrCodeNo, nil) })
			p.writeHeaders(1, false, fields(":status", "200"))
			p.sendData(1, []byte("ok"), 100, nil, true)
			for p.step() == nil {
			}
		})
		h := newTestHandler(t, pki, Options{Backend: addr, Protocol: "h2c"})
		prx := startProxy(t, h, false)
		p := dialRaw(t, pki, prx.addr)
		p.get(1, "/")
		recv(t, arrived, "the request at the backend")
		prx.cancel()
		p.until("the drain's GOAWAY", func() bool { return p.goAway != nil })
		goAwayNow()
		if s := p.response(1); s.status() != "200" {
			t.Fatalf("in-flight: %s", s.status())
		}
		p.until("the connection to close", func() bool { return p.readErr != nil })
		monotonic(t, p)
	})

	t.Run("client error after drain", func(t *testing.T) {
		started := make(chan struct{}, 1)
		release, _ := releaser(t)
		be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			started <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}))
		h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
		prx := startProxy(t, h, false)
		p := dialRaw(t, pki, prx.addr)
		p.get(1, "/hold")
		recv(t, started, "the request at the backend")
		prx.cancel()
		p.until("the drain's GOAWAY", func() bool { return p.goAway != nil })
		// A stream opened after the GOAWAY is refused...
		p.get(3, "/late")
		if s := p.response(3); s.rst == nil || *s.rst != http2.ErrCodeRefusedStream {
			t.Fatalf("stream 3 after GOAWAY: rst %v, want REFUSED_STREAM", s.rst)
		}
		// ...and then the client breaks the protocol (HEADERS on an
		// even stream): a connection error, with a GOAWAY of its own.
		p.get(4, "/even")
		p.until("the connection to close", func() bool { return p.readErr != nil })
		if p.goAway.code != http2.ErrCodeProtocol {
			t.Errorf("last GOAWAY %+v, want PROTOCOL_ERROR", *p.goAway)
		}
		monotonic(t, p)
	})
}

// A stream the backend refuses (REFUSED_STREAM: not processed, safe to
// retry) reaches the client as such and is neither a request answered
// with 5xx nor a backend error, as for streams a backend GOAWAY leaves
// unprocessed.
func TestRelayBackendRefusedStream(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			if id == 1 {
				p.write(func() error { return p.fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) })
				return
			}
			p.writeHeaders(id, true, fields(":status", "200"))
		})
	})
	m := NewMetrics(prometheus.NewRegistry())
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c", Metrics: m})
	p.get(1, "/refused")
	if s := p.response(1); s.rst == nil || *s.rst != http2.ErrCodeRefusedStream || s.header != nil {
		t.Fatalf("stream 1: rst %v header %v, want RST_STREAM REFUSED_STREAM", s.rst, s.header)
	}
	p.get(3, "/fine")
	if s := p.response(3); s.status() != "200" {
		t.Fatalf("stream 3: %s", s.status())
	}
	testnet.WaitFor(t, "the 200 counted", func() bool { return routeCounter(m, "2xx") == 1 && activeStreams(m) == 0 })
	if n := backendErrors(m, kindOther); n != 0 {
		t.Errorf("backend errors (other) = %v, want 0", n)
	}
	if n := routeCounter(m, "5xx"); n != 0 {
		t.Errorf("requests_total{code_class=5xx} = %v for a stream the backend refused unprocessed, want 0", n)
	}
}

// Without a SETTINGS_MAX_FRAME_SIZE from the backend, the client was told
// nothing either, so frames above the default 16384 bytes are a
// FRAME_SIZE_ERROR; the relay must not pass one on to a backend that
// never agreed to it.
func TestRelayDefaultMaxFrameSize(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	var backendMax atomic.Uint32
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			backendMax.Store(p.maxData)
			p.writeHeaders(id, true, fields(":status", "200"))
		})
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c"})
	if v, ok := p.settings[http2.SettingMaxFrameSize]; ok {
		t.Fatalf("relay advertised MAX_FRAME_SIZE %d, though the backend did not", v)
	}
	p.must(p.writeHeaders(1, false, reqFields("POST", "/big-frame")))
	// The relay may close the connection while this is being written.
	p.write(func() error { return p.fr.WriteData(1, true, make([]byte, 20000)) })
	s := p.stream(1)
	p.until("an answer or the connection to close", func() bool { return s.done() || p.readErr != nil })
	if n := backendMax.Load(); n > 16384 {
		t.Errorf("the backend received a %d-byte DATA frame; its (default) SETTINGS_MAX_FRAME_SIZE is 16384", n)
	}
	if s.status() == "200" {
		t.Errorf("a 20000-byte DATA frame was accepted (status 200) though the client was allowed 16384; frames: %s", p.history())
	}
	if p.goAway != nil && p.goAway.code != http2.ErrCodeFrameSize {
		t.Errorf("GOAWAY %+v, want FRAME_SIZE_ERROR", *p.goAway)
	}
}

// Request trailers still reach the backend when they end the last stream
// of a draining connection.
func TestRelayTrailersWhileDraining(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	responded := make(chan struct{})
	got := make(chan []hpack.HeaderField, 1)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		s1 := p.stream(1)
		if p.waitCond(func() bool { return s1.header != nil }) != nil {
			return
		}
		// The response ends before the request does.
		p.writeHeaders(1, false, fields(":status", "200"))
		p.sendData(1, []byte("early"), 100, nil, true)
		close(responded)
		p.waitCond(func() bool { return s1.ended })
		got <- s1.trailer // nil if the connection ended first
	})
	h := newTestHandler(t, pki, Options{Backend: addr, Protocol: "h2c"})
	prx := startProxy(t, h, false)
	p := dialRaw(t, pki, prx.addr)

	p.must(p.writeHeaders(1, false, reqFields("POST", "/upload")))
	recv(t, responded, "the backend's early response")
	s1 := p.stream(1)
	p.until("the response", func() bool { return s1.ended })
	prx.cancel()
	p.until("the drain's GOAWAY", func() bool { return p.goAway != nil })
	p.must(p.sendData(1, []byte("rest of the body"), 100, nil, false))
	p.must(p.writeHeaders(1, true, fields("x-checksum", "abc123")))
	tr := recv(t, got, "the request's end at the backend")
	if fieldValue(tr, "x-checksum") != "abc123" {
		t.Errorf("backend got request trailers %v, want x-checksum: abc123 (the connection was closed before they were written)", tr)
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
}

// A drain does not cut off a response whose last DATA frame the relay is
// still holding back for the client's window (after a body of its own).
func TestRelayDrainWhileHoldingData(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	const frame = 4096
	body := randomBytes(4, 65535)
	sendData, sendDataNow := releaser(t)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		if p.waitCond(func() bool { return p.stream(1).rst != nil && p.stream(3).ended }) != nil {
			return
		}
		if p.writeHeaders(3, false, fields(":status", "200")) != nil {
			return
		}
		<-sendData
		if p.writeDataInFrames(3, body, frame) != nil {
			return
		}
		for p.step() == nil {
		}
	})
	m := NewMetrics(prometheus.NewRegistry())
	h := newTestHandler(t, pki, Options{Backend: addr, Protocol: "h2c", ResponseTimeout: relayTestTimeout, Metrics: m})
	prx := startProxy(t, h, false)
	p := dialRaw(t, pki, prx.addr)

	p.get(1, "/slow")
	own := p.response(1).flow // 504: the client's window is 16 bytes short
	p.get(3, "/big")
	s3 := p.stream(3)
	p.until("stream 3's headers", func() bool { return s3.header != nil })
	sendDataNow()
	// The last frame (END_STREAM) overruns the window by 16 bytes and is
	// held. Drain once the relay holds it: when all that fits has
	// arrived, or the relay has taken the stream off its books. If
	// neither shows, the wait for a frame times out and the drain starts
	// anyway.
	fit := (65535 - own) / frame * frame
	if err := p.waitCond(func() bool { return int64(s3.body.Len()) >= fit || activeStreams(m) == 0 }); err != nil && !errors.Is(err, errNoFrame) {
		t.Fatal(err)
	}
	prx.cancel()
	p.until("the drain's GOAWAY", func() bool { return p.goAway != nil })
	p.must(p.write(func() error { return p.fr.WriteWindowUpdate(0, uint32(own)) }))
	p.until("the end of stream 3 or of the connection", func() bool { return s3.ended || p.readErr != nil })
	if !s3.ended || !bytes.Equal(s3.body.Bytes(), body) {
		t.Fatalf("stream 3: ended %v with %d of %d bytes, then %v; frames: %s", s3.ended, s3.body.Len(), len(body), p.readErr, p.history())
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
}

// A client that keeps opening streams and resetting them before the
// backend can answer (HTTP/2 "rapid reset") is sent GOAWAY
// ENHANCE_YOUR_CALM and cut off; one whose resets come after responses,
// or are paid back by responses, is not.
func TestRelayRapidReset(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	started := make(chan struct{}, 4096) // never full: handlers must not block on it
	release, _ := releaser(t)
	be := startH2CBackend(t, nil, holdOn("/hold", "held", started, release))
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	addr := startProxy(t, h, false).addr

	t.Run("paid back", func(t *testing.T) {
		p := dialRaw(t, pki, addr)
		id := uint32(1)
		// Each early reset is followed by a request that is answered:
		// the count never grows.
		for range maxEarlyResets + 10 {
			p.get(id, "/hold")
			p.must(p.write(func() error { return p.fr.WriteRSTStream(id, http2.ErrCodeCancel) }))
			p.get(id+2, "/ok")
			if s := p.response(id + 2); s.status() != "200" {
				t.Fatalf("stream %d: %s", id+2, s.status())
			}
			id += 4
		}
		if p.goAway != nil {
			t.Fatalf("GOAWAY %+v", p.goAway)
		}
	})

	t.Run("rapid", func(t *testing.T) {
		p := dialRaw(t, pki, addr)
		id := uint32(1)
		for range maxEarlyResets + 1 {
			p.get(id, "/hold")
			p.must(p.write(func() error { return p.fr.WriteRSTStream(id, http2.ErrCodeCancel) }))
			id += 2
		}
		p.until("the connection to close", func() bool { return p.readErr != nil })
		if p.goAway == nil || p.goAway.code != http2.ErrCodeEnhanceYourCalm {
			t.Fatalf("GOAWAY %+v, want ENHANCE_YOUR_CALM; frames: %s", p.goAway, p.history())
		}
	})
}

// A backend that takes the connection but does not speak HTTP/2 (here:
// HTTP/1.1 only, behind a route that says h2c) fails the relay's
// preface. The client's requests get 502 and a GOAWAY sends it to a new
// connection, which tries the backend again.
func TestRelayBackendNotHTTP2(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beHTTP1, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "an HTTP/1.1 answer")
	}))
	m := NewMetrics(prometheus.NewRegistry())
	h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c", Metrics: m})
	addr := startProxy(t, h, false).addr

	p := dialRaw(t, pki, addr)
	p.get(1, "/a")
	s := p.response(1)
	if s.status() != "502" || s.body.String() != "bad gateway\n" {
		t.Fatalf("status %s body %q, want 502 %q; frames: %s", s.status(), s.body.String(), "bad gateway\n", p.history())
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
	if p.goAway == nil || p.goAway.last != 1 || p.goAway.code != http2.ErrCodeNo {
		t.Fatalf("GOAWAY %+v, want last stream 1, NO_ERROR; frames: %s", p.goAway, p.history())
	}

	c, dials := newClient(t, pki, addr, true, "")
	for i := range 3 {
		if code, body := getStatus(t, c, url+"/b"); code != http.StatusBadGateway {
			t.Fatalf("request %d: %d %q, want 502", i, code, body)
		}
	}
	if n := dials.count(); n < 2 {
		t.Errorf("%d client connections for 3 requests; want a new one after each GOAWAY", n)
	}
	if n := backendErrors(m, kindUnreachable); n != 4 {
		t.Errorf("backend errors (unreachable) = %v, want 4", n)
	}
	testnet.WaitFor(t, "5xx counted", func() bool { return routeCounter(m, "5xx") == 4 && activeStreams(m) == 0 })
}

// An upload that keeps moving for longer than response_timeout must not be
// cut with 504: the backend cannot answer before it has the request, and
// it is busy reading it. The client sends a chunk every timeout/10 for
// 1.5 timeouts; the backend reads the whole body, then answers.
func TestSlowUploadNotTimedOut(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	const (
		timeout = time.Second // ten chunk intervals: a slow scheduler cannot look like a stall
		chunks  = 15
		chunk   = 100
	)
	for _, tt := range []struct {
		name    string
		h2      bool
		backend string // also the backend_protocol
	}{
		{"relay h2 client h2c backend", true, beH2C},
		{"http1 client h2c backend", false, beH2C},
		{"http1 client http1 backend", false, beHTTP1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			be := startBackend(t, pki, tt.backend, false, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				buf := make([]byte, chunk)
				for range chunks {
					if _, err := io.ReadFull(r.Body, buf); err != nil {
						return
					}
				}
				io.WriteString(w, "got it all")
			}))
			h := newTestHandler(t, pki, Options{Backend: be.addr, Protocol: tt.backend, ResponseTimeout: timeout})
			addr := startProxy(t, h, false).addr
			c, _ := newClient(t, pki, addr, tt.h2, "")

			pr, pw := io.Pipe()
			defer pw.Close()
			req := mustRequest(t, "POST", url+"/upload", pr)
			req.ContentLength = chunks * chunk
			done := doAsync(c, req)
			sent := make(chan int, 1) // chunks taken by the proxy when the writer stopped
			go func() {
				i := 0
				defer func() { sent <- i }()
				for ; i < chunks; i++ {
					if i > 0 {
						time.Sleep(timeout / 10)
					}
					if _, err := pw.Write(bytes.Repeat([]byte{'a'}, chunk)); err != nil {
						return
					}
				}
				pw.Close()
			}()
			r := recv(t, done, "the response")
			pw.CloseWithError(errors.New("test over"))
			n := recv(t, sent, "the writer")
			if r.err != nil || r.code != http.StatusOK || r.body != "got it all" {
				t.Fatalf("after %d of %d chunks (one every %v), while the body was still moving: %d %q %v; want 200 %q",
					n, chunks, timeout/10, r.code, r.body, r.err, "got it all")
			}
		})
	}
}

// A HEAD request the relay answers itself (here 504) must get the status
// without a body: a response to HEAD carries none (RFC 9110, 9.3.2;
// nghttp2-based clients reset a stream that gets DATA for one).
func TestRelayHeadAnswerHasNoBody(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	release, _ := releaser(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	p := dialRelay(t, pki, Options{Backend: be.addr, Protocol: "h2c", ResponseTimeout: relayTestTimeout})
	p.get(1, "/slow") // GET: the 504 has its body
	p.must(p.writeHeaders(3, true, reqFields("HEAD", "/slow")))
	s1, s3 := p.response(1), p.response(3)
	if s1.status() != "504" || s1.body.String() != "gateway timeout\n" {
		t.Fatalf("GET: %s %q, want 504 with a body", s1.status(), s1.body.String())
	}
	if s3.status() != "504" || s3.flow != 0 {
		t.Fatalf("HEAD: %s with %d bytes of DATA (%q), want 504 without DATA; frames: %s", s3.status(), s3.flow, s3.body.String(), p.history())
	}
	// A Content-Length in a response to HEAD must be the GET's (RFC 9110,
	// 8.6), as net/http sends it on the general path.
	if get, head := fieldValue(s1.header, "content-length"), fieldValue(s3.header, "content-length"); head != get {
		t.Errorf("HEAD: content-length %q, want the GET's %q", head, get)
	}
}

// A client can make the relay reset streams for it: a malformed frame on
// a stream the backend has started (here a WINDOW_UPDATE of 0, a stream
// error) gets it reset at the backend just as the client's own
// RST_STREAM would ("MadeYouReset", CVE-2025-8671). Those resets count
// towards the rapid-reset limit too.
func TestRelayStreamErrorsCountAsResets(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	started := make(chan struct{}, 4096) // never full: handlers must not block on it
	release, _ := releaser(t)
	be := startH2CBackend(t, nil, holdOn("/hold", "held", started, release))
	p := dialRelay(t, pki, Options{Backend: be.addr, Protocol: "h2c"})
	p.fr.AllowIllegalWrites = true // for the WINDOW_UPDATE of 0

	id := uint32(1)
	for range maxEarlyResets + 1 {
		p.get(id, "/hold")
		p.must(p.write(func() error { return p.fr.WriteWindowUpdate(id, 0) }))
		id += 2
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
	if p.goAway == nil || p.goAway.code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %+v, want ENHANCE_YOUR_CALM; frames: %s", p.goAway, p.history())
	}
}

// A client can also have the backend reset streams for it: the relay
// forwards a stream's WINDOW_UPDATE as it is, and one that overflows the
// backend's send window (RFC 9113, 6.9.1) has the backend reset the
// stream with FLOW_CONTROL_ERROR, which frees its place among the
// relay's concurrent streams while the backend may still be working on
// it ("MadeYouReset", CVE-2025-8671). Those resets count towards the
// rapid-reset limit too.
func TestRelayBackendResetsClientCausedCount(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	started := make(chan struct{}, 4096) // never full: handlers must not block on it
	release, _ := releaser(t)
	be := startH2CBackend(t, nil, holdOn("/hold", "held", started, release))
	p := dialRelay(t, pki, Options{Backend: be.addr, Protocol: "h2c"})

	id := uint32(1)
	for range maxEarlyResets + 1 {
		p.get(id, "/hold")
		p.must(p.write(func() error { return p.fr.WriteWindowUpdate(id, 1<<31-1) }))
		// One at a time, so that none is refused for want of room.
		if s := p.response(id); s.rst == nil || *s.rst != http2.ErrCodeFlowControl {
			t.Fatalf("stream %d: rst %v, want the backend's RST_STREAM FLOW_CONTROL_ERROR; frames: %s", id, s.rst, p.history())
		}
		id += 2
	}
	p.until("the connection to close", func() bool { return p.readErr != nil })
	if p.goAway == nil || p.goAway.code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %+v, want ENHANCE_YOUR_CALM; frames: %s", p.goAway, p.history())
	}
}

// recordCounter counts the TLS records read from a connection.
type recordCounter struct {
	net.Conn
	records atomic.Int64
	hdr     []byte // of the record being read, while incomplete
	left    int    // bytes of the current record's body still to come
}

func (c *recordCounter) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	for p := b[:n]; len(p) > 0; {
		if c.left > 0 {
			k := min(c.left, len(p))
			c.left -= k
			p = p[k:]
			continue
		}
		k := min(5-len(c.hdr), len(p))
		c.hdr = append(c.hdr, p[:k]...)
		p = p[k:]
		if len(c.hdr) == 5 {
			c.left = int(c.hdr[3])<<8 | int(c.hdr[4])
			c.hdr = c.hdr[:0]
			c.records.Add(1)
		}
	}
	return n, err
}

// What the relay writes to a client in answer to a burst of its frames
// (a RST_STREAM for each malformed frame, a response of its own for each
// request it refuses) goes out in one flush once the burst is read, as
// everything else does: a flush per frame would cost a TLS record and a
// system call per 13 bytes the client sends, many times what relaying
// those bytes costs.
func TestRelayAnswersToBurstsFlushedOnce(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	addr := startProxy(t, newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"}), false).addr
	const burst = 100
	burstEnd := [8]byte{'b', 'u', 'r', 's', 't'}

	for _, tc := range []struct {
		name  string
		frame func(p *h2Peer, fr *http2.Framer, i int) error
		check func(p *h2Peer) bool
	}{
		{
			"stream errors",
			func(p *h2Peer, fr *http2.Framer, i int) error {
				return fr.WriteWindowUpdate(1, 0) // on a closed stream
			},
			func(p *h2Peer) bool { return p.stream(1).rst != nil && *p.stream(1).rst == http2.ErrCodeProtocol },
		},
		{
			"own answers",
			func(p *h2Peer, fr *http2.Framer, i int) error {
				return fr.WriteHeaders(http2.HeadersFrameParam{
					StreamID: uint32(3 + 2*i), EndStream: true, EndHeaders: true,
					BlockFragment: p.encodeLocked(fields(":method", "CONNECT", ":authority", frontName)),
				})
			},
			func(p *h2Peer) bool {
				for i := range burst {
					if p.stream(uint32(3+2*i)).status() != "405" {
						return false
					}
				}
				return true
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rc *recordCounter
			p := dialRawOver(t, pki, addr, func(c net.Conn) net.Conn { rc = &recordCounter{Conn: c}; return rc })
			p.get(1, "/")
			if s := p.response(1); s.status() != "200" {
				t.Fatalf("stream 1: %s", s.status())
			}
			p.ping("settled!")
			before := rc.records.Load()
			p.must(p.write(func() error {
				// All in one write, so the relay reads them at once.
				var buf bytes.Buffer
				fr := http2.NewFramer(&buf, nil)
				fr.AllowIllegalWrites = true // for the WINDOW_UPDATE of 0
				for i := range burst {
					if err := tc.frame(p, fr, i); err != nil {
						return err
					}
				}
				fr.WritePing(false, burstEnd)
				_, err := p.conn.Write(buf.Bytes())
				return err
			}))
			p.until("the answers and the PING ACK", func() bool { return tc.check(p) && slices.Contains(p.pingAcks, burstEnd) })
			// The answers fill a write buffer or two; the PING's ACK
			// comes from the backend in a record of its own.
			if n := rc.records.Load() - before; n > 5 {
				t.Errorf("%d TLS records for the answers to %d frames read at once, want a few", n, burst)
			}
		})
	}
}

// A header block may be only so long on the wire, however it is cut:
// empty CONTINUATION frames add nothing to it but still have to be read,
// and a client sending them without end (CVE-2024-28182) is cut off with
// a connection error, as one sending too many header bytes is.
func TestRelayEmptyContinuationFlood(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startH2CBackend(t, nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	p := dialRelay(t, pki, Options{Backend: be.addr, Protocol: "h2c"})

	// More empty frames than a block of the largest allowed size would
	// take on the wire (2 × 64 KiB + 64 KiB), then the end of the block.
	const frames = (3*maxHeaderBytes)/9 + 1
	p.must(p.write(func() error {
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: p.encodeLocked(reqFields("GET", "/")), EndStream: true})
		for range frames {
			fr.WriteContinuation(1, false, nil)
		}
		fr.WriteContinuation(1, true, nil)
		fr.WritePing(false, [8]byte{'a', 'f', 't', 'e', 'r'})
		_, err := p.conn.Write(buf.Bytes())
		return err
	}))
	p.until("the connection to close, or the request to be answered", func() bool { return p.readErr != nil || p.stream(1).done() })
	if p.goAway == nil || p.goAway.code != http2.ErrCodeProtocol {
		t.Fatalf("GOAWAY %+v, want PROTOCOL_ERROR; stream 1: %s; frames: %s", p.goAway, p.stream(1).status(), p.history())
	}
}

// A request whose content-length disagrees with its DATA is malformed
// (RFC 9113, 8.1.1) and must not be forwarded: a backend that turns it
// into HTTP/1.1 would frame it by the content-length, and the rest of
// the body, or the next request on its connection, would be read as a
// request of its own ("H2.CL" smuggling).
func TestRelayContentLengthMismatch(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	complete := make(chan string, 16)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			complete <- fmt.Sprintf("%d:%s", id, s.body.String())
			p.writeHeaders(id, true, fields(":status", "200"))
		})
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c"})

	for _, tc := range []struct {
		id     uint32
		name   string
		fields []string
		body   string
	}{
		{1, "declared, no DATA", []string{"content-length", "5"}, ""},
		{3, "DATA beyond it", []string{"content-length", "2"}, "hello"},
		{5, "DATA short of it", []string{"content-length", "10"}, "hi"},
		{7, "two values", []string{"content-length", "1", "content-length", "2"}, "h"},
		{9, "not a number", []string{"content-length", "-1"}, "h"},
	} {
		p.must(p.writeHeaders(tc.id, tc.body == "", reqFields("POST", "/upload", tc.fields...)))
		if tc.body != "" {
			p.must(p.write(func() error { return p.fr.WriteData(tc.id, true, []byte(tc.body)) }))
		}
		if s := p.response(tc.id); s.rst == nil || *s.rst != http2.ErrCodeProtocol || s.header != nil {
			t.Errorf("%s: rst %v status %q, want RST_STREAM PROTOCOL_ERROR only; frames: %s", tc.name, s.rst, s.status(), p.history())
		}
	}
	p.must(p.writeHeaders(11, false, reqFields("POST", "/upload", "content-length", "5")))
	p.must(p.write(func() error { return p.fr.WriteData(11, true, []byte("hello")) }))
	if s := p.response(11); s.status() != "200" {
		t.Fatalf("a well-formed request: %s; frames: %s", s.status(), p.history())
	}
	if got := recv(t, complete, "the well-formed request"); got != "11:hello" {
		t.Errorf("the backend got request %q first, want only 11:hello", got)
	}
}

// Pseudo-header fields the general path's HTTP/2 server refuses as
// malformed (RFC 9113, 8.3.1) are refused by the relay too, rather than
// handed to a backend that may read them differently: a Host that
// disagrees with :authority (which also escapes the 421 check), a
// :path that is not absolute, an :authority with userinfo, a :method
// that is not a token, a :protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL.
func TestRelayMalformedPseudoHeaders(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	complete := make(chan string, 16)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			complete <- fmt.Sprintf("%d:%s", id, fieldValue(s.header, ":path"))
			p.writeHeaders(id, true, fields(":status", "200"))
		})
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c"})

	req := func(method, authority, path string, kv ...string) []hpack.HeaderField {
		return append(fields(":method", method, ":scheme", "https", ":authority", authority, ":path", path), fields(kv...)...)
	}
	id := uint32(1)
	for _, tc := range []struct {
		name   string
		fields []hpack.HeaderField
	}{
		{"host differs", req("GET", frontName, "/x", "host", "other.test")},
		{"two hosts", req("GET", frontName, "/x", "host", frontName, "host", "other.test")},
		{"relative path", req("GET", frontName, "x")},
		{"absolute URI path", req("GET", frontName, "http://other.test/x")},
		{"userinfo", req("GET", "user@"+frontName, "/x")},
		{"bad authority", req("GET", frontName+"/x", "/x")},
		{"method with a space", req("GET /x HTTP/1.1", frontName, "/x")},
		{":protocol, never offered", append(fields(":protocol", "websocket"), req("GET", frontName, "/x")...)},
	} {
		p.must(p.writeHeaders(id, true, tc.fields))
		if s := p.response(id); s.rst == nil || *s.rst != http2.ErrCodeProtocol || s.header != nil {
			t.Errorf("%s: rst %v status %q, want RST_STREAM PROTOCOL_ERROR only; frames: %s", tc.name, s.rst, s.status(), p.history())
		}
		id += 2
	}
	p.must(p.writeHeaders(id, true, req("OPTIONS", frontName, "*", "host", frontName)))
	if s := p.response(id); s.status() != "200" {
		t.Fatalf("a well-formed request: %s; frames: %s", s.status(), p.history())
	}
	if got, want := recv(t, complete, "the well-formed request"), fmt.Sprintf("%d:*", id); got != want {
		t.Errorf("the backend got request %q first, want only %s", got, want)
	}
}

// Trailers with fields that may not be trailers (RFC 9110, 6.5.1), or
// that are connection-specific (RFC 9113, 8.2.2), make the request
// malformed, as on the general path; the backend never sees it end.
func TestRelayMalformedTrailers(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	complete := make(chan uint32, 16)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			complete <- id
			p.writeHeaders(id, true, fields(":status", "200"))
		})
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c"})

	id := uint32(1)
	for _, name := range []string{"content-length", "transfer-encoding", "host", "connection", "upgrade"} {
		p.must(p.writeHeaders(id, false, reqFields("POST", "/upload")))
		p.must(p.write(func() error { return p.fr.WriteData(id, false, []byte("hi")) }))
		p.must(p.writeHeaders(id, true, fields(name, "2")))
		if s := p.response(id); s.rst == nil || *s.rst != http2.ErrCodeProtocol || s.header != nil {
			t.Errorf("trailer %s: rst %v status %q, want RST_STREAM PROTOCOL_ERROR only; frames: %s", name, s.rst, s.status(), p.history())
		}
		id += 2
	}
	p.must(p.writeHeaders(id, false, reqFields("POST", "/upload")))
	p.must(p.writeHeaders(id, true, fields("x-checksum", "abc")))
	if s := p.response(id); s.status() != "200" {
		t.Fatalf("well-formed trailers: %s; frames: %s", s.status(), p.history())
	}
	if got := recv(t, complete, "the well-formed request"); got != id {
		t.Errorf("the backend got request %d first, want only %d", got, id)
	}
}

// A backend's response fields the client must not get are dropped, as
// on the general path (net/http's HTTP/2 transport and server drop them
// there) and as nginx does: connection-specific fields, which make an
// HTTP/2 message malformed (RFC 9113, 8.2.2) so that browsers fail the
// request, and trailers that may not be trailers (RFC 9110, 6.5.1).
func TestRelayResponseFieldsNotForwarded(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			p.writeHeaders(id, false, fields(":status", "200",
				"connection", "keep-alive", "keep-alive", "timeout=5", "proxy-connection", "keep-alive",
				"transfer-encoding", "chunked", "upgrade", "h2c", "x-kept", "yes"))
			p.sendData(id, []byte("body"), 100, nil, false)
			p.writeHeaders(id, true, fields("content-length", "99", "host", "evil.test",
				"transfer-encoding", "chunked", "x-checksum", "abc123"))
		})
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c"})
	p.get(1, "/")
	s := p.response(1)
	if s.status() != "200" || s.body.String() != "body" || s.rst != nil {
		t.Fatalf("%s %q rst %v; frames: %s", s.status(), s.body.String(), s.rst, p.history())
	}
	if got, want := fmt.Sprint(s.header), fmt.Sprint(fields(":status", "200", "x-kept", "yes")); got != want {
		t.Errorf("response header %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(s.trailer), fmt.Sprint(fields("x-checksum", "abc123")); got != want {
		t.Errorf("response trailers %s, want %s", got, want)
	}
}

// A response whose DATA disagrees with its content-length is malformed
// (RFC 9113, 8.1.1), and an intermediary must not forward it: the
// client's stream is reset rather than ended, so that a body cut short
// by a backend cannot pass for a whole one (net/http's transport makes
// the same check on the general path). Responses without content
// (HEAD, 304) carry the length of the one they stand for.
func TestRelayResponseContentLengthMismatch(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	addr := startRawBackend(t, nil, nil, func(p *h2Peer) {
		p.serveRequests(func(id uint32, s *h2Stream) {
			switch fieldValue(s.header, ":path") {
			case "/short":
				p.writeHeaders(id, false, fields(":status", "200", "content-length", "10"))
				p.sendData(id, []byte("hello"), 100, nil, true)
			case "/long":
				p.writeHeaders(id, false, fields(":status", "200", "content-length", "2"))
				p.sendData(id, []byte("hello"), 100, nil, true)
			case "/none":
				p.writeHeaders(id, true, fields(":status", "200", "content-length", "5"))
			case "/trailers":
				p.writeHeaders(id, false, fields(":status", "200", "content-length", "10"))
				p.sendData(id, []byte("hello"), 100, nil, false)
				p.writeHeaders(id, true, fields("x-checksum", "abc"))
			case "/not-modified":
				p.writeHeaders(id, true, fields(":status", "304", "content-length", "5"))
			case "/head":
				p.writeHeaders(id, true, fields(":status", "200", "content-length", "5"))
			default:
				p.writeHeaders(id, false, fields(":status", "200", "content-length", "5"))
				p.sendData(id, []byte("hello"), 100, nil, true)
			}
		})
	})
	p := dialRelay(t, pki, Options{Backend: addr, Protocol: "h2c"})

	for _, tc := range []struct {
		id   uint32
		path string
		rst  bool   // the client's stream is reset
		code string // else its status
	}{
		{1, "/short", true, ""},
		{3, "/long", true, ""},
		{5, "/none", false, "502"},
		{7, "/trailers", true, ""},
		{9, "/not-modified", false, "304"},
	} {
		p.get(tc.id, tc.path)
		s := p.response(tc.id)
		if tc.rst {
			if s.rst == nil || s.ended {
				t.Errorf("%s: rst %v, ended %v; want the stream reset, not ended; frames: %s", tc.path, s.rst, s.ended, p.history())
			}
			continue
		}
		if s.rst != nil || s.status() != tc.code {
			t.Errorf("%s: status %q rst %v, want %s; frames: %s", tc.path, s.status(), s.rst, tc.code, p.history())
		}
	}
	p.must(p.writeHeaders(11, true, reqFields("HEAD", "/head")))
	if s := p.response(11); s.rst != nil || s.status() != "200" || fieldValue(s.header, "content-length") != "5" {
		t.Errorf("HEAD: status %q rst %v, want 200 with content-length 5; frames: %s", s.status(), s.rst, p.history())
	}
	p.get(13, "/ok")
	if s := p.response(13); s.rst != nil || s.status() != "200" || s.body.String() != "hello" {
		t.Errorf("a well-formed response: %s %q rst %v; frames: %s", s.status(), s.body.String(), s.rst, p.history())
	}
}

// heldUntilCancelled is a handler that answers "ok", except on /hold
// (after sending its response headers) and /wait (before): there it
// waits for the request to be cancelled and reports it on cancelled.
func heldUntilCancelled(cancelled chan<- string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hold":
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
		case "/wait":
		default:
			io.WriteString(w, "ok")
			return
		}
		<-r.Context().Done()
		cancelled <- r.URL.RawQuery
	})
}

// servesAfterStreamError checks that the connection still serves a
// request, on stream id, after the stream errors a test provoked: a
// stream error must not end the connection.
func servesAfterStreamError(t *testing.T, p *h2Peer, id uint32) {
	t.Helper()
	p.get(id, "/after")
	if s := p.response(id); s.status() != "200" || s.body.String() != "ok" {
		t.Fatalf("after: %s %q; frames: %s", s.status(), s.body.String(), p.history())
	}
	if p.goAway != nil {
		t.Errorf("GOAWAY %+v; a stream error must not end the connection", p.goAway)
	}
}

// DATA on a stream whose request has ended (half-closed remote) is a
// stream error of type STREAM_CLOSED (RFC 9113, 5.1 and 6.1): the client
// is told its request was not taken whole, and the backend's stream is
// cancelled, rather than the DATA dropped while the response goes on.
func TestRelayDataAfterRequestEnd(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	cancelled := make(chan string, 4)
	be := startH2CBackend(t, nil, heldUntilCancelled(cancelled))
	p := dialRelay(t, pki, Options{Backend: be.addr, Protocol: "h2c"})

	p.get(1, "/hold?late-data")
	s := p.stream(1)
	p.until("the response headers", func() bool { return s.header != nil })
	p.must(p.write(func() error { return p.fr.WriteData(1, false, []byte("late")) }))
	// The relay resets the stream at the client before it forwards the
	// PING, whose answer comes from the backend.
	p.ping("barrier!")
	if s.rst == nil || *s.rst != http2.ErrCodeStreamClosed {
		t.Fatalf("DATA after END_STREAM: rst %v, want RST_STREAM STREAM_CLOSED; frames: %s", s.rst, p.history())
	}
	if got := recv(t, cancelled, "the backend's request to be cancelled"); got != "late-data" {
		t.Errorf("cancelled %q", got)
	}
	servesAfterStreamError(t, p, 3)
}

// RST_STREAM and WINDOW_UPDATE on a stream the client has not opened
// (idle) are connection errors of type PROTOCOL_ERROR (RFC 9113, 5.1);
// on a stream that has closed they are ignored.
func TestRelayFramesOnIdleStreams(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, echo)
	addr := startProxy(t, newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"}), false).addr

	for _, tc := range []struct {
		name  string
		write func(p *h2Peer, id uint32) error
	}{
		{"RST_STREAM", func(p *h2Peer, id uint32) error { return p.fr.WriteRSTStream(id, http2.ErrCodeCancel) }},
		{"WINDOW_UPDATE", func(p *h2Peer, id uint32) error { return p.fr.WriteWindowUpdate(id, 100) }},
	} {
		for _, idle := range []uint32{5, 2} {
			t.Run(fmt.Sprintf("%s on %d", tc.name, idle), func(t *testing.T) {
				p := dialRaw(t, pki, addr)
				p.get(1, "/")
				p.get(3, "/")
				p.response(1)
				p.response(3)
				p.must(p.write(func() error { return tc.write(p, 1) }))
				p.ping("closed!!")
				if p.goAway != nil {
					t.Fatalf("%s on a closed stream: GOAWAY %+v; frames: %s", tc.name, p.goAway, p.history())
				}
				p.must(p.write(func() error { return tc.write(p, idle) }))
				p.until("a GOAWAY", func() bool { return p.goAway != nil })
				if *p.goAway != (goAwayInfo{3, http2.ErrCodeProtocol}) {
					t.Fatalf("%s on idle stream %d: GOAWAY %+v, want last 3 PROTOCOL_ERROR", tc.name, idle, *p.goAway)
				}
			})
		}
	}
}

// A stream that depends on itself is a stream error of type
// PROTOCOL_ERROR (RFC 9113, 5.3.1), which the relay answers itself, as
// it does other malformed frames: forwarded, it would have the backend
// reset the stream, which the relay would count as the backend's failure
// and not as a reset the client caused.
func TestRelaySelfDependentStream(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	cancelled := make(chan string, 4)
	be := startH2CBackend(t, nil, heldUntilCancelled(cancelled))
	m := NewMetrics(prometheus.NewRegistry())
	p := dialRelay(t, pki, Options{Backend: be.addr, Protocol: "h2c", Metrics: m})

	// A PRIORITY frame on a stream not yet opened.
	p.must(p.write(func() error { return p.fr.WritePriority(1, http2.PriorityParam{StreamDep: 1, Weight: 15}) }))
	p.ping("idle-pri")
	if s := p.stream(1); s.rst == nil || *s.rst != http2.ErrCodeProtocol {
		t.Errorf("self-dependent PRIORITY on an idle stream: rst %v, want RST_STREAM PROTOCOL_ERROR; frames: %s", s.rst, p.history())
	}

	// A request whose HEADERS depend on their own stream.
	p.must(p.write(func() error {
		return p.fr.WriteHeaders(http2.HeadersFrameParam{
			StreamID: 3, BlockFragment: p.encodeLocked(reqFields("GET", "/")),
			EndStream: true, EndHeaders: true, Priority: http2.PriorityParam{StreamDep: 3, Weight: 15},
		})
	}))
	if s := p.response(3); s.rst == nil || *s.rst != http2.ErrCodeProtocol || s.header != nil {
		t.Errorf("self-dependent HEADERS: rst %v status %q, want RST_STREAM PROTOCOL_ERROR only; frames: %s", s.rst, s.status(), p.history())
	}
	if n := backendErrors(m, kindOther); n != 0 {
		t.Errorf("self-dependent HEADERS: backend errors = %v: the client's malformed frame was counted against the backend", n)
	}

	// A PRIORITY frame on a stream the backend has yet to answer.
	p.get(5, "/wait?open")
	p.ping("started!") // the backend has the request
	p.must(p.write(func() error { return p.fr.WritePriority(5, http2.PriorityParam{StreamDep: 5, Weight: 15}) }))
	s := p.response(5)
	if s.rst == nil || *s.rst != http2.ErrCodeProtocol || s.header != nil {
		t.Errorf("self-dependent PRIORITY on an open stream: rst %v status %q, want RST_STREAM PROTOCOL_ERROR only; frames: %s", s.rst, s.status(), p.history())
	}
	if got := recv(t, cancelled, "the backend's request to be cancelled"); got != "open" {
		t.Errorf("cancelled %q", got)
	}
	if n := backendErrors(m, kindOther); n != 0 {
		t.Errorf("self-dependent PRIORITY: backend errors = %v: the client's malformed frame was counted against the backend", n)
	}

	servesAfterStreamError(t, p, 7)
}

// A request on a stream ID not above every one before it (one already
// used, or skipped) cannot open a stream: a connection error of type
// PROTOCOL_ERROR (RFC 9113, 5.1.1), not a request left unanswered. Late
// trailers of a stream the relay has closed are still ignored.
func TestRelayStreamIDNotIncreasing(t *testing.T) {
	checkLeaks(t)
	pki := newTestPKI(t)
	be := startBackend(t, pki, beH2C, false, echo)
	addr := startProxy(t, newTestHandler(t, pki, Options{Backend: be.addr, Protocol: "h2c"}), false).addr

	for _, reused := range []uint32{1, 3} {
		t.Run(fmt.Sprint(reused), func(t *testing.T) {
			p := dialRaw(t, pki, addr)
			p.get(1, "/")
			p.response(1)
			p.get(5, "/") // 3 skipped
			p.response(5)
			p.must(p.writeHeaders(5, true, fields("x-late-trailer", "1")))
			p.ping("trailer!")
			if p.goAway != nil {
				t.Fatalf("late trailers: GOAWAY %+v; frames: %s", p.goAway, p.history())
			}
			p.get(reused, "/again")
			p.until("a GOAWAY", func() bool { return p.goAway != nil })
			if *p.goAway != (goAwayInfo{5, http2.ErrCodeProtocol}) {
				t.Fatalf("request on stream %d after 5: GOAWAY %+v, want last 5 PROTOCOL_ERROR; frames: %s", reused, *p.goAway, p.history())
			}
		})
	}
}
