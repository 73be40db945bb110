package rpc_test

import (
	"fmt"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/portcullis/portcullis/rpc"
	"github.com/portcullis/portcullis/rpc/adminpb"
	"github.com/portcullis/portcullis/testpki"
)

// freePort returns a loopback address nothing listens on. rpc.Listen
// binds [admin] listen exactly, so the port is picked here, released,
// and written into the config.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// tlsAdmin is the [admin] TCP part of a config.
func tlsAdmin(addr string, server testpki.Leaf, clientCA string) string {
	s := fmt.Sprintf("listen = %q\ntls_cert = %q\ntls_key = %q\n", addr, server.CertFile, server.KeyFile)
	if clientCA != "" {
		s += fmt.Sprintf("client_ca = %q\n", clientCA)
	}
	return s
}

// tcpAddr is the harness's TCP admin address (after the Unix socket).
func (h *harness) tcpAddr() string {
	h.t.Helper()
	for _, a := range h.run.Addrs() {
		if a.Network() == "tcp" {
			return a.String()
		}
	}
	h.t.Fatal("no TCP admin listener")
	return ""
}

func TestAdminMutualTLS(t *testing.T) {
	serverCA, clientCA, otherCA := testpki.NewCA(t), testpki.NewCA(t), testpki.NewCA(t)
	server := serverCA.Leaf(t, "localhost", "127.0.0.1")
	ops := clientCA.Leaf(t, "ops.example")
	rogue := otherCA.Leaf(t, "ops.example") // same name, wrong issuer

	addr := freePort(t)
	h := newHarness(t, fileConfig{Admin: tlsAdmin(addr, server, clientCA.CertFile)})
	if got := h.tcpAddr(); got != addr {
		t.Fatalf("admin listens on %s, want %s", got, addr)
	}

	for _, tc := range []struct {
		name string
		o    rpc.DialOptions
		ok   bool
	}{
		{"client certificate from client_ca", rpc.DialOptions{CAFile: serverCA.CertFile, CertFile: ops.CertFile, KeyFile: ops.KeyFile}, true},
		{"by DNS name", rpc.DialOptions{CAFile: serverCA.CertFile, CertFile: ops.CertFile, KeyFile: ops.KeyFile, ServerName: "localhost"}, true},
		{"no client certificate", rpc.DialOptions{CAFile: serverCA.CertFile}, false},
		{"client certificate from another CA", rpc.DialOptions{CAFile: serverCA.CertFile, CertFile: rogue.CertFile, KeyFile: rogue.KeyFile}, false},
		{"server not trusted by the client", rpc.DialOptions{CAFile: otherCA.CertFile, CertFile: ops.CertFile, KeyFile: ops.KeyFile}, false},
		{"server name mismatch", rpc.DialOptions{CAFile: serverCA.CertFile, CertFile: ops.CertFile, KeyFile: ops.KeyFile, ServerName: "admin.example"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli, err := rpc.Dial(addr, tc.o)
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close()
			_, err = cli.Status(h.ctx())
			if tc.ok {
				if err != nil {
					t.Fatalf("GetStatus: %v", err)
				}
				if hs, err := cli.Health(h.ctx()); err != nil || hs != healthpb.HealthCheckResponse_SERVING {
					t.Errorf("Health: %v, %v", hs, err)
				}
				return
			}
			wantCode(t, err, codes.Unavailable)
			// Nothing it tried got through.
			if _, err := cli.PutRoute(h.ctx(), &adminpb.Route{Listener: "public", Sni: "evil.test", Backend: h.backends["alt"]}); err == nil {
				t.Error("PutRoute succeeded without an accepted client certificate")
			}
		})
	}
	if got := h.overrides(); len(got) != 0 {
		t.Fatalf("overrides after the refused clients: %v", got)
	}

	// A mutation over mTLS is attributed to the certificate subject,
	// one over the Unix socket to the peer's uid.
	cli, err := rpc.Dial(addr, rpc.DialOptions{CAFile: serverCA.CertFile, CertFile: ops.CertFile, KeyFile: ops.KeyFile})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.PutRoute(h.ctx(), &adminpb.Route{Listener: "public", Sni: "new.test", Backend: h.backends["new"]}); err != nil {
		t.Fatal(err)
	}
	if err := h.cli.SetMaxConnections(h.ctx(), "public", 5); err != nil {
		t.Fatal(err)
	}
	list, err := cli.Overrides(h.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if o := findOverride(list, "route", "public", "new.test", ""); o == nil || o.Actor != "CN=ops.example" {
		t.Errorf("route override %+v, want actor CN=ops.example", o)
	}
	if o := findOverride(list, "listener", "public", "", ""); o == nil || o.Actor != myActor() {
		t.Errorf("listener override %+v, want actor %s", o, myActor())
	}
	// The actor is stored, not only shown.
	want := []string{
		"listener public max=5 actor=" + myActor(),
		"route public new.test set " + h.backends["new"] + " actor=CN=ops.example",
	}
	if got := overrideSet(h.dbOverrides()); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("database %v, want %v", got, want)
	}
	h.wantBackend("public", "new.test", "new")

	// A certificate with an empty subject names its holder only in the
	// subject alternative name: that name is the actor, not "".
	spiffe := clientCA.LeafURI(t, "spiffe://example.org/ops")
	scli, err := rpc.Dial(addr, rpc.DialOptions{CAFile: serverCA.CertFile, CertFile: spiffe.CertFile, KeyFile: spiffe.KeyFile})
	if err != nil {
		t.Fatal(err)
	}
	defer scli.Close()
	if _, err := scli.AddFirewallRule(h.ctx(), "198.51.100.7"); err != nil {
		t.Fatal(err)
	}
	list, err = cli.Overrides(h.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if o := findOverride(list, "firewall", "", "", "198.51.100.7/32"); o == nil || o.Actor != "uri:spiffe://example.org/ops" {
		t.Errorf("firewall override %+v, want actor uri:spiffe://example.org/ops", o)
	}

	// Plaintext gRPC to the TLS port is refused.
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = adminpb.NewAdminClient(conn).GetStatus(h.ctx(), &adminpb.GetStatusRequest{})
	wantCode(t, err, codes.Unavailable)
}

// TestAdminTLSWithoutClientCA: with no client_ca any TLS client may
// call, and its changes are attributed to its address.
func TestAdminTLSWithoutClientCA(t *testing.T) {
	serverCA := testpki.NewCA(t)
	server := serverCA.Leaf(t, "localhost", "127.0.0.1")
	addr := freePort(t)
	h := newHarness(t, fileConfig{Admin: tlsAdmin(addr, server, "")})

	cli, err := rpc.Dial(addr, rpc.DialOptions{CAFile: serverCA.CertFile})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Status(h.ctx()); err != nil {
		t.Fatalf("GetStatus without a client certificate: %v", err)
	}
	if _, err := cli.AddFirewallRule(h.ctx(), "198.51.100.9"); err != nil {
		t.Fatal(err)
	}
	list, err := cli.Overrides(h.ctx())
	if err != nil {
		t.Fatal(err)
	}
	o := findOverride(list, "firewall", "", "", "198.51.100.9/32")
	if o == nil || !strings.HasPrefix(o.Actor, "tls:127.0.0.1:") {
		t.Errorf("firewall override %+v, want actor tls:<client address>", o)
	}

	// The server certificate is still checked.
	bad, err := rpc.Dial(addr, rpc.DialOptions{CAFile: testpki.NewCA(t).CertFile})
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	_, err = bad.Status(h.ctx())
	wantCode(t, err, codes.Unavailable)
}
