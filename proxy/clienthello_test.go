package proxy

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"testing"
)

func TestReadClientHello(t *testing.T) {
	hello := clientHelloBytes(t, &tls.Config{ServerName: "Mixed.Example.com"})
	noSNI := clientHelloBytes(t, &tls.Config{InsecureSkipVerify: true})
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
			ch, err := readClientHello(r, nil)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("no error; sni %q", ch.sni)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ch.sni != tc.wantSNI {
				t.Errorf("sni %q, want %q", ch.sni, tc.wantSNI)
			}
			if !bytes.Equal(ch.raw, tc.in) {
				t.Errorf("raw differs from input (%d vs %d bytes)", len(ch.raw), len(tc.in))
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
	_, err := readClientHello(bytes.NewReader(in), nil)
	if !errors.Is(err, errBadHello) {
		t.Fatalf("err = %v", err)
	}
}

func FuzzReadClientHello(f *testing.F) {
	hello := clientHelloBytes(f, &tls.Config{ServerName: "fuzz.test"})
	f.Add(hello)
	f.Add(splitRecord(hello, 10))
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add([]byte{0x16, 3, 1, 0, 0})
	f.Add(hello[:9])
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		ch, err := readClientHello(r, nil)
		if err != nil {
			return
		}
		consumed := len(in) - r.Len()
		if consumed != len(ch.raw) || !bytes.Equal(ch.raw, in[:consumed]) {
			t.Fatalf("raw (%d bytes) is not what was read (%d bytes)", len(ch.raw), consumed)
		}
		if len(ch.sni) > 255 {
			t.Fatalf("sni of %d bytes", len(ch.sni))
		}
	})
}

func BenchmarkReadClientHello(b *testing.B) {
	hello := clientHelloBytes(b, &tls.Config{ServerName: "bench.example.com"})
	buf := make([]byte, 0, helloBufInitSize)
	r := bytes.NewReader(hello)
	b.ReportAllocs()
	b.SetBytes(int64(len(hello)))
	for b.Loop() {
		r.Reset(hello)
		if _, err := readClientHello(r, buf); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRouteLookup(b *testing.B) {
	for _, n := range []int{10, 10000} {
		tbl := newRouteTable()
		for i := 0; i < n; i++ {
			tbl.add(&route{sni: fmt.Sprintf("host%d.example.com", i)})
			tbl.add(&route{sni: fmt.Sprintf("*.zone%d.example.net", i)})
		}
		tbl.add(&route{sni: "*"})
		for _, tc := range []struct{ name, sni string }{
			{"exact", fmt.Sprintf("host%d.example.com", n/2)},
			{"wildcard", fmt.Sprintf("api.zone%d.example.net", n/3)},
			{"default", "nothing.example.org"},
		} {
			b.Run(fmt.Sprintf("routes=%d/%s", 2*n, tc.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if tbl.lookup(tc.sni) == nil {
						b.Fatal("no route")
					}
				}
			})
		}
	}
}
