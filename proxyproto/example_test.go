package proxyproto_test

import (
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/portcullis/portcullis/proxyproto"
)

func ExampleRead() {
	// Stands in for an accepted *net.TCPConn with a read deadline set.
	conn := strings.NewReader("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n\x16\x03\x01")

	h, err := proxyproto.Read(conn)
	if err != nil {
		fmt.Println(err)
		return
	}
	client := netip.MustParseAddrPort("10.0.0.7:40000") // the socket's peer
	if h.Command == proxyproto.Proxy {
		client = h.Source
	}
	rest, _ := io.ReadAll(conn)
	fmt.Println(h.Version, client, h.Destination)
	fmt.Printf("%q\n", rest)
	// Output:
	// 1 192.0.2.1:56324 198.51.100.2:443
	// "\x16\x03\x01"
}

func ExampleAppendV2() {
	src := netip.MustParseAddrPort("192.0.2.1:56324")
	dst := netip.MustParseAddrPort("198.51.100.2:443")
	fmt.Printf("% x\n", proxyproto.AppendV2(nil, src, dst, "app.example.com"))
	// Output:
	// 0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a 21 11 00 1e c0 00 02 01 c6 33 64 02 dc 04 01 bb 02 00 0f 61 70 70 2e 65 78 61 6d 70 6c 65 2e 63 6f 6d
}
