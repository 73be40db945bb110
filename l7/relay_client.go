package l7

import (
	"errors"
	"net/http"
	"time"

	"golang.org/x/net/http2"
)

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
				err = r.clientStreamError(se)
			}
			if err != nil {
				r.clientFailed(err)
				continue // drains, see end
			}
			// A frame the framer found malformed: answered, and flushed
			// below with the rest (f is nil).
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			err = r.clientData(f)
		case *http2.HeadersFrame:
			var blk *headerBlock
			if blk, err = c.hdec.read(c.fr, f); err == nil {
				err = r.clientHeaders(blk)
			} else if se := (http2.StreamError{}); errors.As(err, &se) {
				err = r.clientStreamError(se)
			}
		case *http2.RSTStreamFrame:
			err = r.clientReset(f)
		case *http2.WindowUpdateFrame:
			err = r.clientWindowUpdate(f)
		case *http2.SettingsFrame:
			err = r.clientSettings(f)
		case *http2.PingFrame:
			b.write(func() error { return b.fr.WritePing(f.IsAck(), f.Data) })
		case *http2.PriorityFrame:
			if f.StreamDep == f.StreamID {
				// A stream cannot depend on itself (RFC 9113, 5.3.1).
				// Forwarded, it would have the backend reset the stream:
				// counted as the backend's failure, not the client's reset.
				err = r.clientStreamError(http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol})
				break
			}
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

// unopenedLocked reports whether stream id is idle: the client has not
// opened it (the relay never opens one: pushes are off). Only HEADERS
// and PRIORITY may name such a stream (RFC 9113, 5.1). Called with r.mu
// held.
func (r *relay) unopenedLocked(id uint32) bool {
	return id%2 == 0 || id > r.lastStream
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
		fields, ok := trailerFields(f)
		if !ok || f.pseudo != 0 || f.truncated || st.bodyLeft > 0 {
			r.mu.Unlock()
			return r.clientStreamError(http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol})
		}
		r.endLocked(st, &st.reqDone)
		r.mu.Unlock()
		b := r.backend
		b.write(func() error { return b.writeHeaders(id, fields, true, http2.PriorityParam{}) })
		r.finalSent()
		return nil
	}
	if id <= r.lastStream {
		r.mu.Unlock()
		if f.pseudo != 0 {
			// A request, not trailers: a new stream must have a higher
			// ID than every stream before it (RFC 9113, 5.1.1), and
			// ignored it would never be answered.
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// Trailers of a stream the relay already answered, refused or
		// finished.
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

	fields, bodyLeft, code, errCode := r.requestFields(f)
	switch {
	case errCode != http2.ErrCodeNo:
		c := r.client
		c.write(func() error { return c.fr.WriteRSTStream(id, errCode) })
		return nil
	case code != 0:
		r.h.metrics.streamStarted()
		r.answer(id, code, f.endStream, isHead(f))
		r.h.metrics.streamDone()
		r.h.metrics.requestDone(code, time.Since(now))
		return nil
	}

	st := &relayStream{id: id, start: now, reqDone: f.endStream, head: isHead(f), bodyLeft: bodyLeft}
	r.mu.Lock()
	if r.ended {
		r.mu.Unlock()
		return nil
	}
	r.streams[id] = st
	if len(r.streams) == 1 {
		// From idle to watching for stalled streams.
		r.quietTicks = 0
		r.idle.Reset(r.h.idleTimeout / 4)
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
	if ok && st.bodyLeft >= 0 {
		// Checked here, where the DATA is, since a backend that turns
		// the request into HTTP/1.1 frames it by its content-length.
		st.bodyLeft -= int64(len(f.Data()))
		if st.bodyLeft < 0 || end && st.bodyLeft != 0 {
			r.mu.Unlock()
			r.client.credit(f.Length) // not forwarded
			return r.clientStreamError(http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol})
		}
	}
	if ok && st.code == 0 {
		// The request is still moving (flow control let this DATA
		// through, so the backend is taking it): the backend cannot be
		// expected to answer yet, and the wait for its response starts
		// over.
		st.timeout.Reset(r.h.responseTimeout)
	}
	if end {
		r.endLocked(st, &st.reqDone)
	}
	idleStream := r.unopenedLocked(id)
	r.mu.Unlock()
	if !ok {
		if idleStream {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// For a stream the relay answered, refused or finished: the
		// backend will never see it, so its window comes back from here.
		r.client.credit(f.Length)
		if st != nil {
			// The request has ended (half-closed remote): DATA after
			// it is a stream error (RFC 9113, 5.1), not something to
			// drop while the response goes on as if the request were
			// whole.
			return r.clientStreamError(http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed})
		}
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
	if r.unopenedLocked(f.StreamID) {
		r.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // RFC 9113, 6.4
	}
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
		return r.calm()
	}
	r.endIfDone()
	return nil
}

// calm is the connection error for a client past maxEarlyResets.
func (r *relay) calm() error {
	r.h.log.Warn("relay: client resets streams before their responses, closing", "client", r.ci.Client, "resets", maxEarlyResets)
	return http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
}

// clientStreamError answers a malformed request (bad header field, bad
// pseudo-header, a body that disagrees with its content-length) with
// RST_STREAM; the connection goes on. A stream the backend started and
// had not answered is reset there too, which the client caused as
// surely as with a RST_STREAM of its own ("MadeYouReset",
// CVE-2025-8671): it counts as an early reset.
func (r *relay) clientStreamError(se http2.StreamError) error {
	r.mu.Lock()
	st := r.streams[se.StreamID]
	calm := false
	if st != nil {
		if st.code == 0 {
			r.earlyResets++
			calm = r.earlyResets > maxEarlyResets
		}
		r.removeLocked(st, http.StatusBadRequest)
	} else if se.StreamID > r.lastStream {
		r.lastStream = se.StreamID
	}
	r.mu.Unlock()
	// Not flushed here: fromClient flushes once it has read what the
	// client sent, so that a burst of malformed frames does not cost a
	// TLS record and a write each.
	c, b := r.client, r.backend
	c.write(func() error { return c.fr.WriteRSTStream(se.StreamID, se.Code) })
	if st != nil {
		b.write(func() error { return b.fr.WriteRSTStream(se.StreamID, http2.ErrCodeCancel) })
		if calm {
			return r.calm()
		}
		r.endIfDone()
	}
	return nil
}

func (r *relay) clientWindowUpdate(f *http2.WindowUpdateFrame) error {
	b := r.backend
	if f.StreamID != 0 {
		r.mu.Lock()
		_, known := r.streams[f.StreamID]
		idle := r.unopenedLocked(f.StreamID)
		r.mu.Unlock()
		switch {
		case idle:
			return http2.ConnectionError(http2.ErrCodeProtocol) // RFC 9113, 5.1
		case known:
			b.write(func() error { return b.fr.WriteWindowUpdate(f.StreamID, f.Increment) })
		}
		return nil
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
	return nil
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
