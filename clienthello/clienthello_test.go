package clienthello

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/portcullis/portcullis/testnet"
)

func TestReadClientHello(t *testing.T) {
	hello := testnet.ClientHello(t, &tls.Config{ServerName: "Mixed.Example.com"})
	noSNI := testnet.ClientHello(t, &tls.Config{InsecureSkipVerify: true})
	for _, tc := range []struct {
		name    string
		in      []byte
		wantSNI string
		wantErr bool
	}{
		{"one record", hello, "Mixed.Example.com", false},
		{"two records", splitRecord(hello, 3), "Mixed.Example.com", false}, // split inside the handshake header
		{"no sni", noSNI, "", false},
		{"empty", nil, "", true},
		{"http", []byte("GET / HTTP/1.1\r\n\r\n"), "", true},
		{"zero-length record", []byte{0x16, 3, 1, 0, 0}, "", true},
		{"not a client_hello", []byte{0x16, 3, 1, 0, 4, 2, 0, 0, 0}, "", true},
		{"truncated body", hello[:len(hello)-10], "", true},
		{"oversized record", []byte{0x16, 3, 1, 0xff, 0xff}, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := bytes.NewReader(append(append([]byte{}, tc.in...), "TRAILER"...))
			ch, err := Read(r, nil)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("no error; sni %q", ch.ServerName)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ch.ServerName != tc.wantSNI {
				t.Errorf("sni %q, want %q", ch.ServerName, tc.wantSNI)
			}
			if !bytes.Equal(ch.Raw, tc.in) {
				t.Errorf("raw differs from input (%d vs %d bytes)", len(ch.Raw), len(tc.in))
			}
			// Nothing past the ClientHello may be consumed.
			if rest, _ := io.ReadAll(r); string(rest) != "TRAILER" {
				t.Errorf("read past the hello: %q left", rest)
			}
		})
	}
}

func TestReadClientHelloTooLarge(t *testing.T) {
	// A handshake header announcing 16 MiB must be refused without
	// reading, let alone buffering, that much.
	in := []byte{0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff}
	_, err := Read(bytes.NewReader(in), nil)
	if !errors.Is(err, ErrNotClientHello) {
		t.Fatalf("err = %v", err)
	}
}

func FuzzReadClientHello(f *testing.F) {
	hello := testnet.ClientHello(f, &tls.Config{ServerName: "fuzz.test"})
	f.Add(hello)
	f.Add(splitRecord(hello, 10))
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add([]byte{0x16, 3, 1, 0, 0})
	f.Add(hello[:9])
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		ch, err := Read(r, nil)
		if err != nil {
			return
		}
		consumed := len(in) - r.Len()
		if consumed != len(ch.Raw) || !bytes.Equal(ch.Raw, in[:consumed]) {
			t.Fatalf("raw (%d bytes) is not what was read (%d bytes)", len(ch.Raw), consumed)
		}
		if len(ch.ServerName) > 255 {
			t.Fatalf("sni of %d bytes", len(ch.ServerName))
		}
	})
}

func BenchmarkReadClientHello(b *testing.B) {
	hello := testnet.ClientHello(b, &tls.Config{ServerName: "bench.example.com"})
	buf := make([]byte, 0, BufferSize)
	r := bytes.NewReader(hello)
	b.ReportAllocs()
	b.SetBytes(int64(len(hello)))
	for b.Loop() {
		r.Reset(hello)
		if _, err := Read(r, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// splitRecord re-frames a single-record ClientHello as two records.
func splitRecord(rec []byte, at int) []byte {
	body := rec[5:]
	mk := func(p []byte) []byte {
		return append([]byte{0x16, rec[1], rec[2], byte(len(p) >> 8), byte(len(p))}, p...)
	}
	return append(mk(body[:at]), mk(body[at:])...)
}

// TestReadNamesProxyHeader: a PROXY protocol header where a ClientHello
// was expected (a balancer sending one to a listener not set to read it)
// is named as such, not only by its first byte's record type.
func TestReadNamesProxyHeader(t *testing.T) {
	for _, in := range []string{
		"PROXY TCP4 192.0.2.1 192.0.2.2 1234 443\r\n",
		"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c",
	} {
		_, err := Read(bytes.NewReader([]byte(in)), nil)
		if !errors.Is(err, ErrNotClientHello) || !strings.Contains(err.Error(), "PROXY protocol header") {
			t.Errorf("Read(%q) = %v, want an error naming a PROXY protocol header", in, err)
		}
	}
	_, err := Read(bytes.NewReader([]byte("GET / HTTP/1.1\r\n\r\n")), nil)
	if err == nil || strings.Contains(err.Error(), "PROXY") {
		t.Errorf("Read(an HTTP request) = %v", err)
	}
}

// TestParserEOFAsRead: a caller that drives the Parser itself (an event
// loop reading a non-blocking socket a byte at a time) and meets the
// client's EOF gets Parser.EOF's error, which must be the one Read
// returns for the same bytes: an EOF between two reads Read makes is
// "EOF", one inside a read "unexpected EOF".
func TestParserEOFAsRead(t *testing.T) {
	hello := splitRecord(testnet.ClientHello(t, &tls.Config{ServerName: "eof.example.com"}), 40)
	for n := range len(hello) {
		in := hello[:n]
		_, want := Read(bytes.NewReader(in), nil)
		if want == nil {
			t.Fatalf("%d bytes: Read returned no error", n)
		}
		p := NewParser(nil)
		r := bytes.NewReader(in)
		var got error
		for got == nil {
			buf := p.Want()[:1]
			k, err := r.Read(buf)
			if err == io.EOF {
				got = p.EOF()
				break
			}
			if _, done, err := p.Add(k); err != nil || done {
				t.Fatalf("%d bytes: Add = done %v, %v", n, done, err)
			}
		}
		if got.Error() != want.Error() {
			t.Errorf("%d bytes: Parser.EOF = %q, Read = %q", n, got, want)
		}
	}
}
