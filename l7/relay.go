package l7

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The HTTP/2 relay carries an HTTP/2 client connection to an h2c or h2
// backend frame by frame, over a backend connection of its own, instead of
// through net/http's server, ReverseProxy and Transport.
//
// Why: on the general path every request crosses a server handler
// goroutine, the Transport's write and read loops and a body pipe, and
// every frame is flushed on its own. Here one goroutine per direction reads
// whatever frames have arrived, forwards them and flushes once, so a
// request costs a header decode and encode and no goroutine hand-off.
//
// The two connections are paired one to one, which keeps the relay nearly
// transparent:
//
//   - Stream IDs are the same on both sides.
//   - Flow control is end to end: the client's SETTINGS_INITIAL_WINDOW_SIZE
//     and MAX_FRAME_SIZE go to the backend and the backend's to the client,
//     DATA frames keep their length and padding, and WINDOW_UPDATEs pass
//     through. The relay holds nothing beyond what is in flight on the
//     sockets.
//   - SETTINGS, their ACKs and PINGs pass through one for one, so each
//     ACK still answers the frame its sender expects.
//   - Header blocks are decoded and re-encoded (each hop has its own HPACK
//     state): the request gets the forwarding headers, and the relay can
//     answer a stream itself (504, 431, 405) without upsetting the
//     client's decoder.
//   - A PROXY v2 header naming the client starts the backend connection
//     when the route asks for one; no other client ever uses it.
//
// What the relay does itself: request validation, forwarding headers,
// MAX_CONCURRENT_STREAMS (the smaller of the backend's and ours), the
// header size limit, the response timeout (504), the idle timeout,
// graceful drain (GOAWAY), and metrics per request.
//
// Flow-control bookkeeping the relay must do because it drops or adds
// frames:
//
//   - DATA it drops (for a stream it already answered, or refused) is
//     credited back to its sender with a connection-level WINDOW_UPDATE.
//   - A body it writes to the client (the "gateway timeout" of a 504) uses
//     the client's connection window without the backend knowing. The
//     relay keeps the client's real connection window, holds backend DATA
//     that would overrun it, and keeps that many bytes of the client's next
//     WINDOW_UPDATEs for itself.

const (
	// relayBufferSize sizes the buffered reader and writer on each side.
	// It holds a burst of small frames (headers, window updates); a DATA
	// frame larger than it is read and written around it, straight from
	// and to the framer's own buffer, so bulk does not need more. Every
	// relayed connection holds four, idle or not.
	relayBufferSize = 4 << 10
	// maxResponseHeaderBytes caps a backend's response header list, like
	// the HTTP/1.1 transport's MaxResponseHeaderBytes.
	maxResponseHeaderBytes = 1 << 20
	defaultMaxFrameSize    = 16 << 10
	defaultWindowSize      = 65535
	maxStreamID            = 1<<31 - 1
	// maxEarlyResets bounds how far a client's streams reset before
	// their response started may outnumber those that got one (each
	// response pays one back). Past it the client is opening and
	// cancelling streams to load the backend (the HTTP/2 "rapid reset"
	// attack, CVE-2023-44487) and gets GOAWAY ENHANCE_YOUR_CALM.
	maxEarlyResets = 2 * maxConcurrentStreams
	// lingerTimeout is how long a finished client connection is still
	// read (and what arrives dropped) before it is closed. Closing a
	// socket with unread input resets it, and the reset can destroy
	// responses and the GOAWAY the client has not read yet; a client
	// that got a GOAWAY normally closes first.
	lingerTimeout = time.Second
)

// errNotRelayed is returned by serveRelay when it could not reach the
// backend and has not touched the client connection: the caller serves
// the connection the general way, which answers 502.
var errNotRelayed = errors.New("backend not reached")

// relay is one client connection paired with one backend connection.
type relay struct {
	h  *Handler
	ci ConnInfo

	client, backend *relayPeer
	clientIP        string
	reqFields       []hpack.HeaderField // requestFields' buffer, reused

	// clientWindow is the client's connection-level receive window as
	// the relay knows it: DATA forwarded and bodies written by the relay
	// take from it, the client's WINDOW_UPDATEs add to it.
	clientWindow atomic.Int64
	// owed counts bytes of bodies the relay wrote to the client; they are
	// kept back from the client's WINDOW_UPDATEs to the backend.
	owed atomic.Int64
	// clientStreamWindow is the client's SETTINGS_INITIAL_WINDOW_SIZE.
	clientStreamWindow atomic.Int64

	// settled is set once the prefaces are exchanged, before the two
	// directions start; later SETTINGS may not change frame sizes.
	settled bool

	mu      sync.Mutex
	streams map[uint32]*relayStream
	// lastStream is the highest stream the client has opened.
	lastStream uint32
	// refuseAbove: new client streams above it are refused. It drops
	// from its maximum when a GOAWAY is sent or forwarded to the client.
	refuseAbove uint32
	// goingAway ends the connection once no stream is left and no
	// stream's last frame is still on its way (finalPending).
	goingAway    bool
	finalPending int
	earlyResets  int    // see maxEarlyResets
	maxStreams   uint32 // SETTINGS_MAX_CONCURRENT_STREAMS as told to the client
	ended        bool
	windowCond   sync.Cond   // signalled when clientWindow grows or the relay ends
	idle         *time.Timer // ends the connection after idleTimeout without streams
	callbacks    sync.WaitGroup
	endOnce      sync.Once
	// draining is set by end: fromClient then only reads and drops what
	// the client still sends, until it closes or lingerTimeout passes.
	draining atomic.Bool
}

// relayStream is one request in flight.
type relayStream struct {
	id      uint32
	start   time.Time
	code    int // final response status; 0 until its headers arrive
	reqDone bool
	resDone bool
	timeout *time.Timer // response timeout, stopped when headers arrive
}

// relayPeer is one side of the relay: reads happen on one goroutine only,
// writes from any goroutine under mu.
type relayPeer struct {
	conn net.Conn
	br   *bufio.Reader
	fr   *http2.Framer
	hdec *headerDecoder

	mu       sync.Mutex
	bw       pooledWriter
	enc      *hpack.Encoder
	encBuf   bytes.Buffer
	maxFrame uint32 // the peer's SETTINGS_MAX_FRAME_SIZE, for header blocks
}

func newRelayPeer(c net.Conn, maxHeaderList uint32) *relayPeer {
	p := &relayPeer{
		conn:     c,
		br:       bufio.NewReaderSize(c, relayBufferSize),
		bw:       pooledWriter{conn: c},
		maxFrame: defaultMaxFrameSize,
	}
	p.fr = http2.NewFramer(&p.bw, p.br)
	// The protocol's default until the peer's SETTINGS say more
	// (NewFramer's own default is the 16 MiB maximum).
	p.fr.SetMaxReadFrameSize(defaultMaxFrameSize)
	p.fr.SetReuseFrames()
	p.hdec = newHeaderDecoder(maxHeaderList)
	p.enc = hpack.NewEncoder(&p.encBuf)
	return p
}

// dialRelayBackend dials the backend for one client connection and
// opens it with a PROXY v2 header and TLS as the route says.
func (h *Handler) dialRelayBackend(ctx context.Context, ci ConnInfo) (net.Conn, error) {
	dial := h.dialBackend
	if h.sendProxy {
		dial = func(ctx context.Context) (net.Conn, error) { return h.dialWithProxyHeader(ctx, ci) }
	}
	if h.protocol == protoH2 {
		return h.dialTLS(ctx, dial)
	}
	return dial(ctx)
}

// serveRelay relays the HTTP/2 connection tc (TLS done, ALPN "h2") to a
// backend connection of its own. It returns errNotRelayed, having read
// nothing from tc, if the backend cannot be reached; otherwise it returns
// when the connection is finished, with both connections closed.
func (h *Handler) serveRelay(ctx context.Context, tc net.Conn, ci ConnInfo) error {
	dctx, cancel := context.WithTimeout(ctx, h.dialTimeout)
	bc, err := h.dialRelayBackend(dctx, ci)
	cancel()
	if err != nil {
		// The general path will try again and answer 502, counted and
		// logged there.
		h.log.Debug("relay: backend not reached", "err", err)
		return errNotRelayed
	}
	defer bc.Close()
	defer tc.Close()

	r := &relay{
		h:       h,
		ci:      ci,
		client:  newRelayPeer(tc, maxHeaderBytes),
		backend: newRelayPeer(bc, maxResponseHeaderBytes),
		streams: make(map[uint32]*relayStream),

		refuseAbove: maxStreamID,
		maxStreams:  maxConcurrentStreams,
	}
	r.windowCond.L = &r.mu
	if ci.Client.IsValid() {
		r.clientIP = ci.Client.Addr().String()
	}
	r.clientWindow.Store(defaultWindowSize)
	r.clientStreamWindow.Store(defaultWindowSize)

	if err := r.start(); err != nil {
		var be backendPrefaceError
		if errors.As(err, &be) {
			r.refuse(be.err)
		} else {
			h.log.Debug("relay: connection preface failed", "client", ci.Client, "err", err)
		}
		return nil
	}

	r.idle = time.AfterFunc(h.idleTimeout, r.idleExpired)
	stop := context.AfterFunc(ctx, r.drain)

	backendDone := make(chan struct{})
	go func() {
		defer close(backendDone)
		r.fromBackend()
	}()
	r.fromClient()
	<-backendDone

	if !stop() {
		// drain was started by ctx; it is quick, but it is ours.
		r.callbacks.Wait()
	}
	r.finish()
	return nil
}

// start exchanges the connection prefaces: the client's SETTINGS go to
// the backend and the backend's to the client (each filtered), under the
// handshake and dial deadlines. Nothing else runs yet.
func (r *relay) start() error {
	c, b := r.client, r.backend
	c.conn.SetReadDeadline(time.Now().Add(tlsHandshakeTimeout))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.br, preface[:]); err != nil {
		return err
	}
	if string(preface[:]) != http2.ClientPreface {
		return errors.New("bad client preface")
	}
	sf, err := readSettings(c.fr)
	if err != nil {
		return err
	}
	c.conn.SetReadDeadline(time.Time{})
	settings, err := r.filterSettings(sf, r.toBackendSetting)
	if err != nil {
		return err
	}
	// Always refuse pushes: the relay would have nothing to do with one.
	settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	b.bw.Write([]byte(http2.ClientPreface))
	if err := b.fr.WriteSettings(settings...); err != nil {
		return backendPrefaceError{err}
	}
	if err := b.bw.Flush(); err != nil {
		return backendPrefaceError{err}
	}

	b.conn.SetReadDeadline(time.Now().Add(r.h.dialTimeout))
	sf, err = readSettings(b.fr)
	if err != nil {
		return backendPrefaceError{err}
	}
	b.conn.SetReadDeadline(time.Time{})
	settings, err = r.filterSettings(sf, r.toClientSetting)
	if err != nil {
		return backendPrefaceError{err}
	}
	// The relay's own limits, whatever the backend said.
	settings = append(settings,
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: r.maxStreams},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderBytes})
	if err := c.fr.WriteSettings(settings...); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	r.settled = true
	return nil
}

// backendPrefaceError is a backend that took the TCP (and TLS)
// connection but did not answer as an HTTP/2 server: most often one that
// speaks only HTTP/1.1, or is too busy to answer within the dial timeout.
type backendPrefaceError struct{ err error }

func (e backendPrefaceError) Error() string {
	return "backend HTTP/2 preface: " + e.err.Error()
}

// refuse serves a client whose backend failed the connection preface as
// the general path would: each request it has sent gets 502, and a
// GOAWAY then sends it to a new connection, which tries the backend
// again. Only the client side runs; nothing reaches the backend.
func (r *relay) refuse(cause error) {
	r.logBackendError(kindUnreachable, cause)
	c := r.client
	c.write(func() error {
		// The relay's SETTINGS, and the ACK the backend would have sent
		// for the client's.
		err := c.fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: maxConcurrentStreams},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderBytes})
		if err == nil {
			err = c.fr.WriteSettingsAck()
		}
		if err == nil {
			err = c.bw.Flush()
		}
		return err
	})
	// Wait for requests no longer than for a handshake.
	c.conn.SetReadDeadline(time.Now().Add(tlsHandshakeTimeout))
	var last uint32
read:
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			break
		}
		switch f := f.(type) {
		case *http2.HeadersFrame:
			blk, err := c.hdec.read(c.fr, f)
			if se := (http2.StreamError{}); err != nil && !errors.As(err, &se) {
				break read // HPACK state lost
			}
			if err == nil && blk.streamID%2 == 1 && blk.streamID > last {
				last = blk.streamID
				start := time.Now()
				r.h.metrics.streamStarted()
				r.h.metrics.backendError(kindUnreachable)
				r.answer(last, http.StatusBadGateway, blk.endStream)
				r.h.metrics.streamDone()
				r.h.metrics.requestDone(http.StatusBadGateway, time.Since(start))
			}
		case *http2.DataFrame:
			c.credit(f.Length)
		case *http2.SettingsFrame:
			if !f.IsAck() {
				c.write(c.fr.WriteSettingsAck)
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				c.write(func() error { return c.fr.WritePing(true, f.Data) })
			}
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				r.clientWindow.Add(int64(f.Increment))
			}
		case *http2.GoAwayFrame:
			return
		}
		if last != 0 && c.br.Buffered() == 0 {
			break read // answered what the client had sent
		}
	}
	c.write(func() error { return c.fr.WriteGoAway(last, http2.ErrCodeNo, nil) })
	c.flush()
	c.conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	for {
		if _, err := c.fr.ReadFrame(); err != nil && !errors.As(err, new(http2.StreamError)) {
			return
		}
	}
}

func readSettings(fr *http2.Framer) (*http2.SettingsFrame, error) {
	f, err := fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return nil, errors.New("connection preface without SETTINGS")
	}
	return sf, nil
}

// filterSettings passes sf's settings through filter, which applies what
// the relay must know and says what the other side gets.
func (r *relay) filterSettings(sf *http2.SettingsFrame, filter func(http2.Setting) (http2.Setting, bool)) ([]http2.Setting, error) {
	var settings []http2.Setting
	err := sf.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		if s, keep := filter(s); keep {
			settings = append(settings, s)
		}
		return nil
	})
	return settings, err
}

// toBackendSetting filters one of the client's settings on its way to the
// backend.
func (r *relay) toBackendSetting(s http2.Setting) (http2.Setting, bool) {
	switch s.ID {
	case http2.SettingHeaderTableSize:
		// HPACK state is per hop: this sizes the relay's encoder.
		r.client.mu.Lock()
		r.client.enc.SetMaxDynamicTableSizeLimit(s.Val)
		r.client.mu.Unlock()
		return s, false
	case http2.SettingEnablePush:
		// start sends 0 whatever the client allows: the relay forwards
		// no pushes.
		return s, false
	case http2.SettingInitialWindowSize:
		r.clientStreamWindow.Store(int64(s.Val))
		return s, true
	case http2.SettingMaxFrameSize:
		// Backend DATA frames reach the client as they are, so the
		// client's limit is the backend's. It is fixed once the relay
		// runs: the backend's framer is read on another goroutine.
		if r.settled {
			return s, false
		}
		r.backend.fr.SetMaxReadFrameSize(s.Val)
		r.client.maxFrame = s.Val
		return s, true
	case http2.SettingMaxHeaderListSize:
		return s, true
	}
	return s, false
}

// toClientSetting filters one of the backend's settings on its way to the
// client.
func (r *relay) toClientSetting(s http2.Setting) (http2.Setting, bool) {
	switch s.ID {
	case http2.SettingHeaderTableSize:
		r.backend.mu.Lock()
		r.backend.enc.SetMaxDynamicTableSizeLimit(s.Val)
		r.backend.mu.Unlock()
		return s, false
	case http2.SettingMaxConcurrentStreams:
		r.mu.Lock()
		r.maxStreams = min(s.Val, maxConcurrentStreams)
		s.Val = r.maxStreams
		r.mu.Unlock()
		// start appends the value itself.
		return s, r.settled
	case http2.SettingInitialWindowSize:
		return s, true
	case http2.SettingMaxFrameSize:
		if r.settled {
			return s, false
		}
		r.client.fr.SetMaxReadFrameSize(s.Val)
		r.backend.maxFrame = s.Val
		return s, true
	}
	// ENABLE_PUSH is the client's to say; ENABLE_CONNECT_PROTOCOL is not
	// offered because the relay refuses CONNECT; MAX_HEADER_LIST_SIZE
	// towards the client is the relay's own, sent by start.
	return s, false
}

// fromClient forwards the client's frames to the backend until the client
// connection fails or is closed. It flushes the backend side whenever it
// has consumed everything the client has sent so far.
func (r *relay) fromClient() {
	c, b := r.client, r.backend
	for {
		f, err := c.fr.ReadFrame()
		if r.draining.Load() {
			if err != nil && !errors.As(err, new(http2.StreamError)) {
				return
			}
			continue
		}
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				r.clientStreamError(se)
				continue
			}
			r.clientFailed(err)
			continue // drains, see end
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			err = r.clientData(f)
		case *http2.HeadersFrame:
			var blk *headerBlock
			if blk, err = c.hdec.read(c.fr, f); err == nil {
				err = r.clientHeaders(blk)
			} else if se := (http2.StreamError{}); errors.As(err, &se) {
				r.clientStreamError(se)
				err = nil
			}
		case *http2.RSTStreamFrame:
			err = r.clientReset(f)
		case *http2.WindowUpdateFrame:
			r.clientWindowUpdate(f)
		case *http2.SettingsFrame:
			err = r.clientSettings(f)
		case *http2.PingFrame:
			b.write(func() error { return b.fr.WritePing(f.IsAck(), f.Data) })
		case *http2.PriorityFrame:
			b.write(func() error { return b.fr.WritePriority(f.StreamID, f.PriorityParam) })
		case *http2.GoAwayFrame:
			r.clientGoAway(f)
		case *http2.PushPromiseFrame:
			err = http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// Anything else (PRIORITY_UPDATE, unknown extensions) is
		// hop-by-hop and dropped.
		if err != nil {
			r.clientFailed(err)
			continue // drains, see end
		}
		if c.br.Buffered() == 0 {
			// Input drained: send what it produced, including frames
			// for the client itself (RST_STREAM, WINDOW_UPDATE).
			b.flush()
			c.flush()
		}
	}
}

// fromBackend forwards the backend's frames to the client until the
// backend connection fails or is closed.
func (r *relay) fromBackend() {
	c, b := r.client, r.backend
	for {
		f, err := b.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				r.backendStreamError(se)
				continue
			}
			r.backendFailed(err)
			return
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			r.backendData(f)
		case *http2.HeadersFrame:
			var blk *headerBlock
			if blk, err = b.hdec.read(b.fr, f); err == nil {
				r.backendHeaders(blk)
			} else if se := (http2.StreamError{}); errors.As(err, &se) {
				r.backendStreamError(se)
				err = nil
			}
		case *http2.RSTStreamFrame:
			r.backendReset(f)
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 || r.known(f.StreamID) {
				c.write(func() error { return c.fr.WriteWindowUpdate(f.StreamID, f.Increment) })
			}
		case *http2.SettingsFrame:
			err = r.backendSettings(f)
		case *http2.PingFrame:
			c.write(func() error { return c.fr.WritePing(f.IsAck(), f.Data) })
		case *http2.GoAwayFrame:
			r.backendGoAway(f)
		case *http2.PushPromiseFrame:
			// The relay told the backend ENABLE_PUSH = 0.
			err = http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				b.write(func() error { return b.fr.WriteGoAway(0, http2.ErrCode(ce), nil) })
				b.flush()
			}
			r.backendFailed(err)
			return
		}
		if b.br.Buffered() == 0 {
			c.flush()
			b.flush()
		}
	}
}

// write runs fn, which writes frames, under p's lock. A write error means
// the peer is gone: its connection is closed, so that its reading side
// ends the relay.
func (p *relayPeer) write(fn func() error) {
	p.mu.Lock()
	err := fn()
	p.mu.Unlock()
	if err != nil {
		p.conn.Close()
	}
}

func (p *relayPeer) flush() {
	p.write(p.bw.Flush)
}

// pooledWriter buffers writes to conn in a bufio.Writer borrowed from a
// pool while there is something to send, and gives it back on Flush, so
// an idle connection holds no write buffer. Used under relayPeer.mu.
type pooledWriter struct {
	conn net.Conn
	bw   *bufio.Writer
}

var relayWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, relayBufferSize) }}

func (w *pooledWriter) Write(p []byte) (int, error) {
	if w.bw == nil {
		w.bw = relayWriters.Get().(*bufio.Writer)
		w.bw.Reset(w.conn)
	}
	return w.bw.Write(p)
}

func (w *pooledWriter) Flush() error {
	if w.bw == nil {
		return nil
	}
	err := w.bw.Flush()
	if err == nil {
		w.bw.Reset(nil)
		relayWriters.Put(w.bw)
		w.bw = nil
	}
	// After an error the buffer stays: bufio keeps failing every later
	// write with it, which is what the relay wants of a dead peer.
	return err
}

// writeHeaders encodes fields and writes them as one HEADERS frame and as
// many CONTINUATIONs as the peer's frame size needs. Called with p.mu
// held, so that the block is contiguous on the wire and encoded in the
// order it is sent.
func (p *relayPeer) writeHeaders(id uint32, fields []hpack.HeaderField, end bool, prio http2.PriorityParam) error {
	p.encBuf.Reset()
	for _, f := range fields {
		p.enc.WriteField(f)
	}
	block := p.encBuf.Bytes()
	max := int(p.maxFrame)
	if !prio.IsZero() {
		max -= 5
	}
	frag := block[:min(len(block), max)]
	block = block[len(frag):]
	err := p.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID:      id,
		BlockFragment: frag,
		EndStream:     end,
		EndHeaders:    len(block) == 0,
		Priority:      prio,
	})
	for err == nil && len(block) > 0 {
		frag = block[:min(len(block), int(p.maxFrame))]
		block = block[len(frag):]
		err = p.fr.WriteContinuation(id, len(block) == 0, frag)
	}
	return err
}

var zeroPadding [255]byte

// forwardData writes f to p unchanged, padding included, so that both
// hops count the same bytes against flow control.
func (p *relayPeer) forwardData(f *http2.DataFrame) {
	data := f.Data()
	var pad []byte
	if f.Flags.Has(http2.FlagDataPadded) {
		pad = zeroPadding[:int(f.Length)-len(data)-1]
	}
	p.write(func() error { return p.fr.WriteDataPadded(f.StreamID, f.StreamEnded(), data, pad) })
}

// credit returns n bytes of connection-level window to p, for DATA the
// relay dropped.
func (p *relayPeer) credit(n uint32) {
	if n > 0 {
		p.write(func() error { return p.fr.WriteWindowUpdate(0, n) })
	}
}

func (r *relay) known(id uint32) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.streams[id]
	return ok
}

// clientHeaders handles a request's headers (a new stream) or trailers.
func (r *relay) clientHeaders(f *headerBlock) error {
	id := f.streamID
	if id%2 == 0 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	now := time.Now()
	r.mu.Lock()
	if st := r.streams[id]; st != nil {
		// Trailers: the request must end with them.
		if st.reqDone || !f.endStream {
			r.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if f.pseudo != 0 || f.truncated {
			r.mu.Unlock()
			r.clientStreamError(http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol})
			return nil
		}
		st.reqDone = true
		if st.resDone {
			r.finishLocked(st)
		} else {
			r.finalPending++
		}
		r.mu.Unlock()
		b := r.backend
		b.write(func() error { return b.writeHeaders(id, f.fields, true, http2.PriorityParam{}) })
		r.finalSent()
		return nil
	}
	if id <= r.lastStream {
		// A stream the relay already answered, refused or finished.
		r.mu.Unlock()
		return nil
	}
	r.lastStream = id
	if id > r.refuseAbove || uint32(len(r.streams)) >= r.maxStreams {
		r.mu.Unlock()
		c := r.client
		c.write(func() error { return c.fr.WriteRSTStream(id, http2.ErrCodeRefusedStream) })
		return nil
	}
	r.mu.Unlock()

	fields, code, errCode := r.requestFields(f)
	switch {
	case errCode != http2.ErrCodeNo:
		c := r.client
		c.write(func() error { return c.fr.WriteRSTStream(id, errCode) })
		return nil
	case code != 0:
		r.h.metrics.streamStarted()
		r.answer(id, code, f.endStream)
		r.h.metrics.streamDone()
		r.h.metrics.requestDone(code, time.Since(now))
		return nil
	}

	st := &relayStream{id: id, start: now, reqDone: f.endStream}
	r.mu.Lock()
	if r.ended {
		r.mu.Unlock()
		return nil
	}
	r.streams[id] = st
	if len(r.streams) == 1 {
		r.idle.Stop()
	}
	st.timeout = time.AfterFunc(r.h.responseTimeout, func() { r.responseTimedOut(st) })
	r.mu.Unlock()
	r.h.metrics.streamStarted()

	b := r.backend
	b.write(func() error { return b.writeHeaders(id, fields, f.endStream, f.priority) })
	return nil
}

func (r *relay) clientData(f *http2.DataFrame) error {
	id := f.StreamID
	r.mu.Lock()
	st := r.streams[id]
	ok := st != nil && !st.reqDone
	end := ok && f.StreamEnded()
	if end {
		st.reqDone = true
		if st.resDone {
			r.finishLocked(st)
		} else {
			r.finalPending++
		}
	}
	idleStream := id > r.lastStream
	r.mu.Unlock()
	if !ok {
		if idleStream {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// For a stream the relay answered, refused or finished: the
		// backend will never see it, so its window comes back from here.
		r.client.credit(f.Length)
		return nil
	}
	r.backend.forwardData(f)
	if end {
		r.finalSent()
	}
	return nil
}

func (r *relay) clientReset(f *http2.RSTStreamFrame) error {
	r.mu.Lock()
	st := r.streams[f.StreamID]
	calm := false
	if st != nil {
		code := st.code
		if code == 0 {
			code = statusClientClosed
			r.earlyResets++
			calm = r.earlyResets > maxEarlyResets
		}
		r.removeLocked(st, code)
	}
	r.mu.Unlock()
	if st == nil {
		return nil
	}
	b := r.backend
	b.write(func() error { return b.fr.WriteRSTStream(f.StreamID, f.ErrCode) })
	if calm {
		r.h.log.Warn("relay: client resets streams before their responses, closing", "client", r.ci.Client, "resets", maxEarlyResets)
		return http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
	}
	r.endIfDone()
	return nil
}

// clientStreamError answers a malformed request (bad header field, bad
// pseudo-header) with RST_STREAM; the connection goes on.
func (r *relay) clientStreamError(se http2.StreamError) {
	r.mu.Lock()
	st := r.streams[se.StreamID]
	if st != nil {
		r.removeLocked(st, http.StatusBadRequest)
	} else if se.StreamID > r.lastStream {
		r.lastStream = se.StreamID
	}
	r.mu.Unlock()
	c, b := r.client, r.backend
	c.write(func() error { return c.fr.WriteRSTStream(se.StreamID, se.Code) })
	c.flush()
	if st != nil {
		b.write(func() error { return b.fr.WriteRSTStream(se.StreamID, http2.ErrCodeCancel) })
		r.endIfDone()
	}
}

func (r *relay) clientWindowUpdate(f *http2.WindowUpdateFrame) {
	b := r.backend
	if f.StreamID != 0 {
		if r.known(f.StreamID) {
			b.write(func() error { return b.fr.WriteWindowUpdate(f.StreamID, f.Increment) })
		}
		return
	}
	n := int64(f.Increment)
	if r.clientWindow.Add(n)-n < 0 {
		// fromBackend may be waiting for this.
		r.mu.Lock()
		r.windowCond.Broadcast()
		r.mu.Unlock()
	}
	n -= r.takeOwed(n)
	if n > 0 {
		b.write(func() error { return b.fr.WriteWindowUpdate(0, uint32(n)) })
	}
}

// takeOwed takes up to n of the bytes the relay owes the backend's view
// of the client's window.
func (r *relay) takeOwed(n int64) int64 {
	for {
		owed := r.owed.Load()
		take := min(owed, n)
		if take == 0 || r.owed.CompareAndSwap(owed, owed-take) {
			return take
		}
	}
}

func (r *relay) clientSettings(f *http2.SettingsFrame) error {
	b := r.backend
	if f.IsAck() {
		b.write(b.fr.WriteSettingsAck)
		return nil
	}
	settings, err := r.filterSettings(f, r.toBackendSetting)
	if err != nil {
		return err
	}
	b.write(func() error { return b.fr.WriteSettings(settings...) })
	return nil
}

func (r *relay) clientGoAway(f *http2.GoAwayFrame) {
	b := r.backend
	b.write(func() error { return b.fr.WriteGoAway(f.LastStreamID, f.ErrCode, nil) })
	r.mu.Lock()
	r.goingAway = true
	r.mu.Unlock()
	r.endIfDone()
}

// clientFailed ends the relay after the client connection failed, closed,
// or broke the protocol (then it gets a GOAWAY saying so).
func (r *relay) clientFailed(err error) {
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		r.mu.Lock()
		last := min(r.lastStream, r.refuseAbove)
		r.mu.Unlock()
		c := r.client
		c.write(func() error { return c.fr.WriteGoAway(last, http2.ErrCode(ce), nil) })
		c.flush()
		r.h.log.Debug("relay: client protocol error", "client", r.ci.Client, "err", err)
	}
	r.end()
}

// backendHeaders forwards response headers (1xx, final) or trailers.
func (r *relay) backendHeaders(f *headerBlock) {
	id := f.streamID
	r.mu.Lock()
	st := r.streams[id]
	if st == nil || st.resDone {
		// The relay answered, or the client reset it; the block has
		// been decoded, which is all HPACK needs.
		r.mu.Unlock()
		return
	}
	bad := f.truncated
	if st.code == 0 {
		code := parseStatus(f.pseudoValue("status"))
		switch {
		case code == 0 || f.pseudo != pseudoStatus || (code < 200 && f.endStream):
			bad = true
		case code >= 200:
			st.code = code
			st.timeout.Stop()
			r.earlyResets = max(0, r.earlyResets-1)
		}
	} else if !f.endStream || f.pseudo != 0 {
		bad = true // trailers end the stream and have no pseudo-headers
	}
	if bad {
		r.removeLocked(st, http.StatusBadGateway)
		r.mu.Unlock()
		r.backendError(kindOther, errors.New("malformed or oversized response headers"))
		b := r.backend
		b.write(func() error { return b.fr.WriteRSTStream(id, http2.ErrCodeProtocol) })
		if st.code == 0 {
			r.answer(id, http.StatusBadGateway, st.reqDone)
		} else {
			c := r.client
			c.write(func() error { return c.fr.WriteRSTStream(id, http2.ErrCodeInternal) })
		}
		r.endIfDone()
		return
	}
	end := f.endStream
	if end {
		st.resDone = true
		if st.reqDone {
			r.finishLocked(st)
		} else {
			r.finalPending++
		}
	}
	r.mu.Unlock()
	c := r.client
	c.write(func() error { return c.writeHeaders(id, f.fields, end, http2.PriorityParam{}) })
	if end {
		r.finalSent()
	}
}

func (r *relay) backendData(f *http2.DataFrame) {
	id := f.StreamID
	r.mu.Lock()
	st := r.streams[id]
	ok := st != nil && st.code != 0 && !st.resDone
	end := ok && f.StreamEnded()
	if end {
		st.resDone = true
		if st.reqDone {
			r.finishLocked(st)
		} else {
			r.finalPending++
		}
	}
	r.mu.Unlock()
	if !ok {
		r.backend.credit(f.Length)
		return
	}
	if f.Length == 0 || r.spendClientWindow(int64(f.Length)) {
		r.client.forwardData(f)
	}
	if end {
		r.finalSent()
	}
}

// spendClientWindow takes n bytes from the client's connection window,
// waiting while a body the relay wrote itself has overdrawn it. It
// reports false if the relay ended meanwhile.
func (r *relay) spendClientWindow(n int64) bool {
	if r.clientWindow.Add(-n) >= 0 {
		return true
	}
	// What is already buffered fits the window and is what the client
	// needs to see before it grants more.
	r.client.flush()
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.clientWindow.Load() < 0 && !r.ended {
		r.windowCond.Wait()
	}
	return !r.ended
}

func (r *relay) backendReset(f *http2.RSTStreamFrame) {
	r.mu.Lock()
	st := r.streams[f.StreamID]
	if st != nil {
		code := st.code
		switch {
		case code != 0:
		case f.ErrCode == http2.ErrCodeRefusedStream:
			// Not processed: the client may retry it, so it is not
			// counted as a request (as after a GOAWAY).
		default:
			code = http.StatusBadGateway
		}
		r.removeLocked(st, code)
	}
	r.mu.Unlock()
	if st == nil {
		return
	}
	if st.code == 0 && f.ErrCode != http2.ErrCodeRefusedStream {
		r.backendError(kindOther, http2.StreamError{StreamID: f.StreamID, Code: f.ErrCode})
	}
	c := r.client
	c.write(func() error { return c.fr.WriteRSTStream(f.StreamID, f.ErrCode) })
	r.endIfDone()
}

func (r *relay) backendStreamError(se http2.StreamError) {
	r.mu.Lock()
	st := r.streams[se.StreamID]
	if st != nil {
		r.removeLocked(st, http.StatusBadGateway)
	}
	r.mu.Unlock()
	b := r.backend
	b.write(func() error { return b.fr.WriteRSTStream(se.StreamID, se.Code) })
	if st == nil {
		return
	}
	r.backendError(kindOther, se)
	if st.code == 0 {
		r.answer(se.StreamID, http.StatusBadGateway, st.reqDone)
	} else {
		c := r.client
		c.write(func() error { return c.fr.WriteRSTStream(se.StreamID, http2.ErrCodeInternal) })
	}
	r.endIfDone()
}

func (r *relay) backendSettings(f *http2.SettingsFrame) error {
	c := r.client
	if f.IsAck() {
		c.write(c.fr.WriteSettingsAck)
		return nil
	}
	settings, err := r.filterSettings(f, r.toClientSetting)
	if err != nil {
		return err
	}
	c.write(func() error { return c.fr.WriteSettings(settings...) })
	return nil
}

// backendGoAway passes the backend's GOAWAY on: the client learns which
// of its streams the backend will never process and opens a new
// connection (and so a new backend connection) for them.
func (r *relay) backendGoAway(f *http2.GoAwayFrame) {
	r.mu.Lock()
	r.goingAway = true
	r.refuseAbove = min(r.refuseAbove, f.LastStreamID)
	last := r.refuseAbove
	for id, st := range r.streams {
		if id > f.LastStreamID {
			// Never processed: the client retries it elsewhere, so it
			// is not counted as a request.
			r.removeLocked(st, 0)
		}
	}
	r.mu.Unlock()
	c := r.client
	c.write(func() error { return c.fr.WriteGoAway(last, f.ErrCode, nil) })
	c.flush()
	r.endIfDone()
}

// backendFailed ends the relay after the backend connection closed or
// failed: requests still waiting for headers get 502, responses cut short
// are reset, and the client gets a GOAWAY.
func (r *relay) backendFailed(err error) {
	r.mu.Lock()
	if r.ended {
		r.mu.Unlock()
		return
	}
	var waiting, cut []*relayStream
	for _, st := range r.streams {
		if st.code == 0 {
			waiting = append(waiting, st)
			r.removeLocked(st, http.StatusBadGateway)
		} else {
			cut = append(cut, st)
			r.removeLocked(st, st.code)
		}
	}
	// A GOAWAY may not raise the last stream of one sent before.
	last := min(r.lastStream, r.refuseAbove)
	r.mu.Unlock()

	for range waiting {
		r.h.metrics.backendError(kindOther)
	}
	if len(waiting)+len(cut) > 0 {
		r.logBackendError(kindOther, err)
	}
	c := r.client
	for _, st := range waiting {
		r.answer(st.id, http.StatusBadGateway, st.reqDone)
	}
	for _, st := range cut {
		c.write(func() error { return c.fr.WriteRSTStream(st.id, http2.ErrCodeInternal) })
	}
	c.write(func() error { return c.fr.WriteGoAway(last, http2.ErrCodeNo, nil) })
	c.flush()
	r.end()
}

// backendError counts and logs (rate-limited) a request the backend
// failed.
func (r *relay) backendError(kind string, err error) {
	r.h.metrics.backendError(kind)
	r.logBackendError(kind, err)
}

func (r *relay) logBackendError(kind string, err error) {
	if ok, suppressed := r.h.logLimit.allow(time.Now()); ok {
		r.h.log.Warn("backend error", "backend", r.h.backend, "kind", kind, "err", err, "suppressed", suppressed)
	}
}

// responseTimedOut answers 504 for a request whose response headers did
// not arrive in time, and cancels it at the backend.
func (r *relay) responseTimedOut(st *relayStream) {
	if !r.enterCallback() {
		return
	}
	defer r.callbacks.Done()
	r.mu.Lock()
	if r.streams[st.id] != st || st.code != 0 {
		r.mu.Unlock()
		return
	}
	r.removeLocked(st, http.StatusGatewayTimeout)
	reqDone := st.reqDone
	r.mu.Unlock()
	r.backendError(kindTimeout, errResponseTimeout)
	b := r.backend
	b.write(func() error { return b.fr.WriteRSTStream(st.id, http2.ErrCodeCancel) })
	b.flush()
	r.answer(st.id, http.StatusGatewayTimeout, reqDone)
	r.endIfDone()
}

// answer writes the relay's own short response on stream id, and resets
// the stream if the client is still sending its request.
func (r *relay) answer(id uint32, code int, reqDone bool) {
	body := statusBodies[code]
	n := int64(len(body))
	c := r.client
	c.write(func() error {
		withBody := r.clientWindow.Load() >= n && r.clientStreamWindow.Load() >= n
		if !withBody {
			body = ""
		}
		fields := []hpack.HeaderField{
			{Name: ":status", Value: statusText(code)},
			{Name: "content-type", Value: "text/plain; charset=utf-8"},
			{Name: "x-content-type-options", Value: "nosniff"},
			{Name: "content-length", Value: statusText(len(body))},
		}
		if err := c.writeHeaders(id, fields, body == "", http2.PriorityParam{}); err != nil {
			return err
		}
		if body != "" {
			r.clientWindow.Add(-n)
			r.owed.Add(n)
			if err := c.fr.WriteData(id, true, []byte(body)); err != nil {
				return err
			}
		}
		if !reqDone {
			// Stop the rest of the request body (RFC 9113, 8.1).
			if err := c.fr.WriteRSTStream(id, http2.ErrCodeNo); err != nil {
				return err
			}
		}
		return c.bw.Flush()
	})
}

// removeLocked forgets a finished stream and records it with status
// code; code 0 records no request (one the backend never processed).
// Called with r.mu held.
func (r *relay) removeLocked(st *relayStream, code int) {
	delete(r.streams, st.id)
	st.timeout.Stop()
	r.h.metrics.streamDone()
	if code != 0 {
		r.h.metrics.requestDone(code, time.Since(st.start))
	}
	if len(r.streams) == 0 && !r.ended {
		r.idle.Reset(r.h.idleTimeout)
	}
}

// finalSent is called after the last frame of a stream removed by
// finishLocked has been written.
func (r *relay) finalSent() {
	r.mu.Lock()
	r.finalPending--
	r.mu.Unlock()
	r.endIfDone()
}

// finishLocked removes a stream whose last frame the caller is about to
// forward; the connection does not end before finalSent. Called with r.mu
// held.
func (r *relay) finishLocked(st *relayStream) {
	r.removeLocked(st, st.code)
	r.finalPending++
}

// endIfDone ends a connection that is going away once its last stream is
// done.
func (r *relay) endIfDone() {
	r.mu.Lock()
	done := r.goingAway && len(r.streams) == 0 && r.finalPending == 0 && !r.ended
	r.mu.Unlock()
	if done {
		r.client.flush()
		r.backend.flush()
		r.end()
	}
}

// drain starts a graceful close when the proxy shuts down: GOAWAY to the
// client, streams in flight finish, new ones are refused.
func (r *relay) drain() {
	if !r.enterCallback() {
		return
	}
	defer r.callbacks.Done()
	r.goAway()
}

// idleExpired closes a connection that had no stream for idleTimeout.
func (r *relay) idleExpired() {
	if !r.enterCallback() {
		return
	}
	defer r.callbacks.Done()
	r.mu.Lock()
	busy := len(r.streams) > 0
	r.mu.Unlock()
	if !busy {
		r.goAway()
	}
}

func (r *relay) goAway() {
	r.mu.Lock()
	r.goingAway = true
	r.refuseAbove = min(r.refuseAbove, r.lastStream)
	last := r.refuseAbove
	r.mu.Unlock()
	c := r.client
	c.write(func() error { return c.fr.WriteGoAway(last, http2.ErrCodeNo, nil) })
	c.flush()
	r.endIfDone()
}

// enterCallback admits a timer or context callback unless the relay has
// ended; finish waits for the ones admitted.
func (r *relay) enterCallback() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ended {
		return false
	}
	r.callbacks.Add(1)
	return true
}

// end closes the backend connection and lets the client's linger, which
// ends both directions' reads.
func (r *relay) end() {
	r.endOnce.Do(func() {
		r.mu.Lock()
		r.ended = true
		r.windowCond.Broadcast()
		r.mu.Unlock()
		r.draining.Store(true)
		r.backend.conn.Close()
		// The client connection closes once fromClient returns; see
		// lingerTimeout.
		r.client.conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	})
}

// finish runs after both directions have stopped: it records the streams
// the client left behind and waits for callbacks still running.
func (r *relay) finish() {
	r.end()
	r.idle.Stop()
	r.mu.Lock()
	for _, st := range r.streams {
		code := st.code
		if code == 0 {
			code = statusClientClosed
		}
		r.removeLocked(st, code)
	}
	r.mu.Unlock()
	r.callbacks.Wait()
}
