package rpc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/regularfile"
	"github.com/portcullis/portcullis/rpc/adminpb"
)

// Running is the admin API's open sockets.
type Running struct {
	servers []*grpc.Server
	lns     []net.Listener
	unix    string // socket path to remove on Stop
	addrs   []net.Addr
}

// Addrs returns the bound addresses (Unix socket first when configured).
func (r *Running) Addrs() []net.Addr { return r.addrs }

// stopGrace is how long Stop lets admin calls in flight finish before it
// cuts them. Calls are short, but a client that stops reading a Snapshot
// stream (a suspended ctl, say) blocks its call in flow control for as
// long as it likes, and without a bound the daemon could not exit.
var stopGrace = 5 * time.Second

// Stop closes the sockets, letting calls in flight finish for stopGrace (5 s),
// then cancels the rest.
func (r *Running) Stop() {
	done := make(chan struct{})
	go func() {
		for _, s := range r.servers {
			s.GracefulStop()
		}
		close(done)
	}()
	grace := time.NewTimer(stopGrace)
	select {
	case <-done:
	case <-grace.C:
		// Stop is grpc's way to abort a GracefulStop: it closes the
		// transports, so blocked calls fail and GracefulStop returns.
		for _, s := range r.servers {
			s.Stop()
		}
		<-done
	}
	grace.Stop()
	// Close the sockets here too: a Serve goroutine that had not started
	// when GracefulStop ran closes its listener whenever it gets to run,
	// and a Unix listener unlinks its path on Close — by then possibly a
	// new socket bound at the same path. Closing now makes that later
	// Close a no-op (the unlink happens once).
	for _, ln := range r.lns {
		ln.Close()
	}
	if r.unix != "" {
		os.Remove(r.unix)
	}
}

// Listen serves srv on the sockets cfg.Admin names: the Unix socket
// (mode 0600: file permissions are its access control) and/or TCP with
// TLS, mutual when client_ca is set. It starts nothing when neither is
// configured. A failure closes whatever it opened.
func Listen(cfg *config.Config, srv *Server, log *slog.Logger) (_ *Running, err error) {
	r := &Running{}
	defer func() {
		if err != nil {
			r.Stop()
		}
	}()
	a := cfg.Admin
	if a.UnixSocket != "" {
		path := cfg.Resolve(a.UnixSocket)
		ln, err := listenUnix(path)
		if err != nil {
			return nil, cfg.KeyError("admin.unix_socket", err)
		}
		r.unix = path
		gs := newGRPC(srv, grpc.Creds(peerCredentials{}))
		r.servers = append(r.servers, gs)
		r.lns = append(r.lns, ln)
		r.addrs = append(r.addrs, ln.Addr())
		go gs.Serve(ln)
	}
	if a.Listen != "" {
		tc, err := serverTLS(cfg)
		if err != nil {
			return nil, err
		}
		if a.ClientCA == "" {
			log.Warn("admin API on TCP without client_ca: any TLS client may call it", "listen", a.Listen)
		}
		ln, err := net.Listen("tcp", a.Listen)
		if err != nil {
			return nil, cfg.KeyError("admin.listen", err)
		}
		gs := newGRPC(srv, grpc.Creds(credentials.NewTLS(tc)))
		r.servers = append(r.servers, gs)
		r.lns = append(r.lns, ln)
		r.addrs = append(r.addrs, ln.Addr())
		go gs.Serve(ln)
	}
	return r, nil
}

func newGRPC(srv *Server, opts ...grpc.ServerOption) *grpc.Server {
	gs := grpc.NewServer(append(opts, grpc.ConnectionTimeout(10*time.Second))...)
	adminpb.RegisterAdminServer(gs, srv)
	hs := health.NewServer()
	hs.SetServingStatus(adminpb.Admin_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	return gs
}

// listenUnix binds a Unix socket, replacing a stale socket file left by
// a process that died, but refusing one a live process still serves.
func listenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by a running process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
	}
	// bind(2) creates the socket file with the umask's mode, and a chmod
	// afterwards would leave a moment in which anyone the umask lets in
	// could connect. So bind under a umask that yields 0600. The umask is
	// process-wide: a file another goroutine creates in this instant
	// comes out stricter than asked, never looser.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	// Running.Stop removes the path itself, once.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	return ln, nil
}

// CheckTLS loads the admin API's TLS material (certificate, key, client
// CA) as Listen would, without opening any socket, so `check` catches
// what would stop the daemon from starting. Without [admin] listen there
// is nothing to load.
func CheckTLS(cfg *config.Config) error {
	if cfg.Admin.Listen == "" {
		return nil
	}
	_, err := serverTLS(cfg)
	return err
}

func serverTLS(cfg *config.Config) (*tls.Config, error) {
	a := cfg.Admin
	certPEM, err := readPEMFile(cfg.Resolve(a.TLSCert))
	if err != nil {
		return nil, cfg.KeyError("admin.tls_cert", err)
	}
	keyPEM, err := readPEMFile(cfg.Resolve(a.TLSKey))
	if err != nil {
		return nil, cfg.KeyError("admin.tls_key", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, cfg.KeyError("admin.tls_cert", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}
	if a.ClientCA != "" {
		pem, err := readPEMFile(cfg.Resolve(a.ClientCA))
		if err != nil {
			return nil, cfg.KeyError("admin.client_ca", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, cfg.KeyError("admin.client_ca", errors.New("no PEM certificates found"))
		}
		tc.ClientCAs = pool
		tc.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return tc, nil
}

// maxPEMFile bounds the admin certificate, key and client CA files, as
// l7 bounds a route's.
const maxPEMFile = 4 << 20

// readPEMFile reads one of the admin API's TLS files, at most maxPEMFile
// bytes, refusing anything but a regular file (see regularfile).
func readPEMFile(path string) ([]byte, error) { return regularfile.Read(path, maxPEMFile) }

// actor names who made a call, for the override's audit columns: the
// client certificate's subject over mTLS, the peer's uid over the Unix
// socket.
func actor(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "unknown"
	}
	switch ai := p.AuthInfo.(type) {
	case credentials.TLSInfo:
		if certs := ai.State.PeerCertificates; len(certs) > 0 {
			return certActor(certs[0])
		}
		return "tls:" + p.Addr.String()
	case peerCredInfo:
		return "uid:" + strconv.Itoa(int(ai.uid))
	}
	return "unknown"
}

// peerCredentials is the Unix socket's transport "security": it does no
// handshake, but reads the connecting process's uid from the kernel
// (SO_PEERCRED) so calls can be attributed.
type peerCredentials struct{}

type peerCredInfo struct {
	credentials.CommonAuthInfo
	uid uint32
}

func (peerCredInfo) AuthType() string { return "peercred" }

func (peerCredentials) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, peerCredInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (peerCredentials) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, nil, errors.New("rpc: peer credentials need a Unix socket")
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return nil, nil, err
	}
	if cerr != nil {
		return nil, nil, cerr
	}
	return c, peerCredInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}, uid: cred.Uid}, nil
}

func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}
func (p peerCredentials) Clone() credentials.TransportCredentials { return p }
func (peerCredentials) OverrideServerName(string) error           { return nil }

// certActor names a client certificate's holder: its subject, or, for a
// certificate with an empty subject that names its holder only in the
// subject alternative name (RFC 5280 4.1.2.6; SPIFFE IDs), that name,
// so the mutation is not recorded as made by no one.
func certActor(c *x509.Certificate) string {
	if s := c.Subject.String(); s != "" {
		return s
	}
	switch {
	case len(c.URIs) > 0:
		return "uri:" + c.URIs[0].String()
	case len(c.DNSNames) > 0:
		return "dns:" + c.DNSNames[0]
	case len(c.EmailAddresses) > 0:
		return "email:" + c.EmailAddresses[0]
	case len(c.IPAddresses) > 0:
		return "ip:" + c.IPAddresses[0].String()
	}
	return "serial:" + c.SerialNumber.Text(16)
}
