package l7

import (
	"errors"
	"io"
	"net/http"
	"time"

	"golang.org/x/net/http2"
)

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
				r.answer(last, http.StatusBadGateway, blk.endStream, isHead(blk))
				c.flush()
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
