package l7

import (
	"errors"
	"net/http"
	"time"

	"golang.org/x/net/http2"
)

// fromBackend forwards the backend's frames to the client until the
// backend connection fails or is closed.
func (r *relay) fromBackend() {
	c, b := r.client, r.backend
	for {
		f, err := b.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if !errors.As(err, &se) {
				r.backendFailed(err)
				return
			}
			// Answered, and flushed below with the rest (f is nil).
			r.backendStreamError(se)
			err = nil
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
			if r.backendReset(f) {
				return // the client is cut off; end has closed the backend
			}
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
	trailers := st.code != 0
	if !trailers {
		code := parseStatus(f.pseudoValue("status"))
		switch {
		case code == 0 || f.pseudo != pseudoStatus || (code < 200 && f.endStream):
			bad = true
		case code >= 200:
			left, ok := responseLength(f, code, st.head)
			if !ok || f.endStream && left > 0 {
				bad = true
				break
			}
			st.code = code
			st.resLeft = left
			st.timeout.Stop()
			r.earlyResets = max(0, r.earlyResets-1)
		}
	} else if !f.endStream || f.pseudo != 0 || st.resLeft > 0 {
		bad = true // trailers end the stream and have no pseudo-headers
	}
	if bad {
		r.malformedResponseLocked(st, errors.New("malformed or oversized response headers"))
		return
	}
	end := f.endStream
	if end {
		r.endLocked(st, &st.resDone)
	}
	r.mu.Unlock()
	fields := responseFields(f, trailers)
	c := r.client
	c.write(func() error { return c.writeHeaders(id, fields, end, http2.PriorityParam{}) })
	if end {
		r.finalSent()
	}
}

// malformedResponseLocked ends a stream whose response is malformed
// (RFC 9113, 8.1.1): reset at the backend, and answered 502 or, if its
// headers have gone out, reset at the client, so that it cannot pass for
// a whole response. Entered with r.mu held; it releases it.
func (r *relay) malformedResponseLocked(st *relayStream, err error) {
	id := st.id
	r.removeLocked(st, http.StatusBadGateway)
	r.mu.Unlock()
	r.backendError(kindOther, err)
	b := r.backend
	b.write(func() error { return b.fr.WriteRSTStream(id, http2.ErrCodeProtocol) })
	if st.code == 0 {
		r.answer(id, http.StatusBadGateway, st.reqDone, st.head)
	} else {
		c := r.client
		c.write(func() error { return c.fr.WriteRSTStream(id, http2.ErrCodeInternal) })
	}
	r.endIfDone()
}

func (r *relay) backendData(f *http2.DataFrame) {
	id := f.StreamID
	r.mu.Lock()
	st := r.streams[id]
	ok := st != nil && st.code != 0 && !st.resDone
	end := ok && f.StreamEnded()
	if ok && st.resLeft >= 0 {
		st.resLeft -= int64(len(f.Data()))
		if st.resLeft < 0 || end && st.resLeft > 0 {
			r.backend.credit(f.Length) // not forwarded
			r.malformedResponseLocked(st, errors.New("response body disagrees with its content-length"))
			return
		}
	}
	if end {
		r.endLocked(st, &st.resDone)
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

// backendReset forwards a backend's RST_STREAM. It reports whether it
// ended the relay, for a client past maxEarlyResets.
func (r *relay) backendReset(f *http2.RSTStreamFrame) bool {
	r.mu.Lock()
	st := r.streams[f.StreamID]
	calm := false
	if st != nil {
		code := st.code
		switch {
		case code != 0:
		case f.ErrCode == http2.ErrCodeRefusedStream:
			// Not processed: the client may retry it, so it is not
			// counted as a request (as after a GOAWAY).
		default:
			code = http.StatusBadGateway
			if clientCaused(f.ErrCode) {
				r.earlyResets++
				calm = r.earlyResets > maxEarlyResets
			}
		}
		r.removeLocked(st, code)
	}
	r.mu.Unlock()
	if st == nil {
		return false
	}
	if st.code == 0 && f.ErrCode != http2.ErrCodeRefusedStream {
		r.backendError(kindOther, http2.StreamError{StreamID: f.StreamID, Code: f.ErrCode})
	}
	c := r.client
	c.write(func() error { return c.fr.WriteRSTStream(f.StreamID, f.ErrCode) })
	if calm {
		r.clientFailed(r.calm())
		return true
	}
	r.endIfDone()
	return false
}

// clientCaused reports whether a backend's RST_STREAM with code says the
// stream broke the protocol. The relay forwards the client's frames as
// they are, so a client can have the backend reset streams it has
// started (a WINDOW_UPDATE that overflows the backend's send window, DATA
// past its receive window) as surely as with a RST_STREAM of its own
// ("MadeYouReset", CVE-2025-8671), while the relay takes each reset
// stream off its count of concurrent ones. Such resets of streams not
// yet answered count towards maxEarlyResets.
func clientCaused(code http2.ErrCode) bool {
	switch code {
	case http2.ErrCodeProtocol, http2.ErrCodeFlowControl, http2.ErrCodeStreamClosed, http2.ErrCodeFrameSize:
		return true
	}
	return false
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
		r.answer(se.StreamID, http.StatusBadGateway, st.reqDone, st.head)
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
//
// The last stream the client is told is never above the last one the
// relay has forwarded. A graceful shutdown may start with a GOAWAY naming
// the highest stream ID (grpc-go, Envoy), promising to serve streams
// still on their way, but the relay ends the connection as soon as its
// streams are done, without waiting for the backend's second GOAWAY;
// streams the client sent meanwhile are refused, and it retries them.
func (r *relay) backendGoAway(f *http2.GoAwayFrame) {
	r.mu.Lock()
	r.goingAway = true
	r.refuseAbove = min(r.refuseAbove, f.LastStreamID, r.lastStream)
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
		r.answer(st.id, http.StatusBadGateway, st.reqDone, st.head)
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
