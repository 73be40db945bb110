package l7

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
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
//     answer a stream itself (504, 431, 421, 405) without upsetting the
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

// The relay's files: relay.go pairs the connections and keeps the streams
// and the connection's lifecycle; relay_preface.go exchanges the
// prefaces and filters SETTINGS; relay_client.go and relay_backend.go
// handle each direction's frames; relay_peer.go is one side's framer and
// buffered writer; relay_headers.go decodes header blocks and builds the
// request the backend gets.

const (
	// relayBufferSize sizes the buffered reader and writer on each side.
	// It holds a burst of small frames (headers, window updates); a DATA
	// frame larger than it is read and written around it, straight from
	// and to the framer's own buffer, so bulk does not need more. A
	// relayed connection holds its two readers while idle; writers are
	// borrowed while there is something to send (pooledWriter).
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
	// attack, CVE-2023-44487) and gets GOAWAY ENHANCE_YOUR_CALM. Streams
	// the relay resets for a malformed frame of the client's count too.
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
	windowCond   sync.Cond // signalled when clientWindow grows or the relay ends
	// idle ends the connection after idleTimeout without streams
	// (counted from idleSince); while streams are open it ticks every
	// quarter idleTimeout and ends a connection on which nothing was
	// read from either side for a whole idleTimeout (see idleExpired).
	idle         *time.Timer
	idleSince    time.Time
	lastReceived uint64 // bytes read, both sides, at the last tick
	quietTicks   int
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
	head    bool // a HEAD request: the relay's own answer has no body
	resDone bool
	timeout *time.Timer // response timeout, stopped when headers arrive
	// bodyLeft is how much of the request's content-length its DATA
	// has yet to bring; -1 without one.
	bodyLeft int64
	// resLeft is the same for the response: what its content-length
	// has yet to bring, 0 for a response without content (HEAD, 204,
	// 304), -1 without a content-length.
	resLeft int64
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
	// A backend that stops reading must not pin the relay either.
	bc = newStallConn(bc, h.idleTimeout)
	defer bc.Close()
	defer tc.Close()
	if ci.Cut != nil {
		// The caller cuts by closing tc's socket, which the relay only
		// notices when it reads it: not while it is blocked writing.
		defer context.AfterFunc(ci.Cut, func() { bc.Close() })()
	}

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

	r.idleSince = time.Now()
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
	r.answer(st.id, http.StatusGatewayTimeout, reqDone, st.head)
	r.client.flush()
	r.endIfDone()
}

// answer writes the relay's own short response on stream id (without
// the body for a HEAD request), and resets the stream if the client is
// still sending its request. The caller flushes: the direction loops do
// once their input is read, so that answers to a burst of requests share
// a write.
func (r *relay) answer(id uint32, code int, reqDone, head bool) {
	body := statusBodies[code]
	n := int64(len(body))
	c := r.client
	c.write(func() error {
		// A HEAD response's length is the GET's (RFC 9110, 8.6).
		length := len(body)
		withBody := !head && r.clientWindow.Load() >= n && r.clientStreamWindow.Load() >= n
		if !withBody {
			body = ""
			if !head {
				length = 0
			}
		}
		fields := []hpack.HeaderField{
			{Name: ":status", Value: strconv.Itoa(code)},
			{Name: "content-type", Value: "text/plain; charset=utf-8"},
			{Name: "x-content-type-options", Value: "nosniff"},
			{Name: "content-length", Value: strconv.Itoa(length)},
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
			return c.fr.WriteRSTStream(id, http2.ErrCodeNo)
		}
		return nil
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
		r.idleSince = time.Now()
		r.idle.Reset(r.h.idleTimeout)
	}
}

// finalSent is called after a frame that endLocked announced has been
// written.
func (r *relay) finalSent() {
	r.mu.Lock()
	r.finalPending--
	r.mu.Unlock()
	r.endIfDone()
}

// endLocked records that one direction of st ends with the frame the
// caller is about to forward: done is &st.reqDone or &st.resDone. The
// stream is finished once both have ended, and the connection does not
// end before the caller's finalSent. Called with r.mu held.
func (r *relay) endLocked(st *relayStream, done *bool) {
	*done = true
	if st.reqDone && st.resDone {
		r.removeLocked(st, st.code)
	}
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

// idleExpired closes a connection that had no stream for idleTimeout,
// and one whose open streams are stalled: nothing read from either side
// for idleTimeout (a client that stopped reading and granting window, a
// backend that went silent after its headers), as idle_timeout closes a
// silent L4 relay. Streams still waiting for their response headers are
// the response timeout's to judge, not this.
func (r *relay) idleExpired() {
	if !r.enterCallback() {
		return
	}
	defer r.callbacks.Done()
	r.mu.Lock()
	if len(r.streams) == 0 {
		rest := r.h.idleTimeout - time.Since(r.idleSince)
		if rest > 0 {
			// The last stream ended just as a tick fired.
			r.idle.Reset(rest)
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
		r.goAway()
		return
	}
	received := r.client.received.Load() + r.backend.received.Load()
	r.quietTicks++
	if received != r.lastReceived {
		r.lastReceived, r.quietTicks = received, 0
	}
	for _, st := range r.streams {
		if st.code == 0 {
			r.quietTicks = 0
			break
		}
	}
	if r.quietTicks < 4 {
		r.idle.Reset(r.h.idleTimeout / 4)
		r.mu.Unlock()
		return
	}
	r.stalledLocked()
}

// stalledLocked ends a connection whose streams made no progress for
// idleTimeout: each is reset on both sides and the client gets a GOAWAY.
// It is entered with r.mu held, in the same critical section as the
// verdict, so a stream opened meanwhile cannot be reset with the stalled
// ones; it releases r.mu before writing.
func (r *relay) stalledLocked() {
	if r.ended {
		r.mu.Unlock()
		return
	}
	ids := make([]uint32, 0, len(r.streams))
	for _, st := range r.streams {
		ids = append(ids, st.id)
		r.removeLocked(st, st.code)
	}
	r.goingAway = true
	r.refuseAbove = min(r.refuseAbove, r.lastStream)
	last := r.refuseAbove
	r.mu.Unlock()
	r.h.log.Debug("relay: streams stalled for the idle timeout, closing", "client", r.ci.Client, "streams", len(ids))
	c, b := r.client, r.backend
	for _, id := range ids {
		b.write(func() error { return b.fr.WriteRSTStream(id, http2.ErrCodeCancel) })
		c.write(func() error { return c.fr.WriteRSTStream(id, http2.ErrCodeCancel) })
	}
	b.flush()
	c.write(func() error { return c.fr.WriteGoAway(last, http2.ErrCodeNo, nil) })
	c.flush()
	r.end()
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
