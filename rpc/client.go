package rpc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/portcullis/portcullis/rpc/adminpb"
)

// DialOptions configure a TCP connection to the admin API. They are
// ignored for Unix sockets.
type DialOptions struct {
	CAFile     string // server CA; default the system roots
	CertFile   string // client certificate for mTLS
	KeyFile    string
	ServerName string // default: the host of the address
}

// Client wraps every admin call.
type Client struct {
	conn  *grpc.ClientConn
	admin adminpb.AdminClient
}

// Dial connects to "unix:/path/to.sock" or "host:port" (TLS). Like
// grpc.NewClient it does not wait for the connection; the first call
// does.
func Dial(target string, o DialOptions) (*Client, error) {
	var creds credentials.TransportCredentials
	var opts []grpc.DialOption
	if path, ok := strings.CutPrefix(target, "unix:"); ok {
		if path == "" {
			return nil, errors.New("rpc: empty unix socket path")
		}
		creds = insecure.NewCredentials() // the socket's file mode is the access control
		// grpc reads a "unix:" target as a URL: a '#' or '?' in the path
		// would cut it short and a '%' be decoded or refused. Dial the
		// path as given instead; the target is only the authority.
		target = "passthrough:///localhost"
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	} else {
		// grpc takes any other target as a name to resolve: a socket
		// path written without "unix:" would fail only at the first
		// call, as "name resolver error: produced zero addresses".
		if _, _, err := net.SplitHostPort(target); err != nil {
			return nil, fmt.Errorf("rpc: %q is not unix:PATH or HOST:PORT (a Unix socket needs the unix: prefix)", target)
		}
		tc := &tls.Config{ServerName: o.ServerName, MinVersion: tls.VersionTLS12}
		if o.CAFile != "" {
			pem, err := os.ReadFile(o.CAFile)
			if err != nil {
				return nil, fmt.Errorf("rpc: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("rpc: %s: no PEM certificates", o.CAFile)
			}
		}
		if o.CertFile != "" || o.KeyFile != "" {
			cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("rpc: client certificate: %w", err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		creds = credentials.NewTLS(tc)
	}
	conn, err := grpc.NewClient(target, append(opts, grpc.WithTransportCredentials(creds))...)
	if err != nil {
		return nil, fmt.Errorf("rpc: %w", err)
	}
	return &Client{conn: conn, admin: adminpb.NewAdminClient(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Health asks the standard gRPC health service about the admin service.
func (c *Client) Health(ctx context.Context) (healthpb.HealthCheckResponse_ServingStatus, error) {
	r, err := healthpb.NewHealthClient(c.conn).Check(ctx, &healthpb.HealthCheckRequest{Service: adminpb.Admin_ServiceDesc.ServiceName})
	if err != nil {
		return 0, err
	}
	return r.Status, nil
}

func (c *Client) Status(ctx context.Context) (*adminpb.GetStatusResponse, error) {
	return c.admin.GetStatus(ctx, &adminpb.GetStatusRequest{})
}

// Routes lists the effective routes, of one listener or ("") all.
func (c *Client) Routes(ctx context.Context, listener string) ([]*adminpb.Route, error) {
	r, err := c.admin.ListRoutes(ctx, &adminpb.ListRoutesRequest{Listener: listener})
	if err != nil {
		return nil, err
	}
	return r.Routes, nil
}

func (c *Client) PutRoute(ctx context.Context, r *adminpb.Route) (*adminpb.Route, error) {
	resp, err := c.admin.PutRoute(ctx, &adminpb.PutRouteRequest{Route: r})
	if err != nil {
		return nil, err
	}
	return resp.Route, nil
}

func (c *Client) DeleteRoute(ctx context.Context, listener, sni string) error {
	_, err := c.admin.DeleteRoute(ctx, &adminpb.DeleteRouteRequest{Listener: listener, Sni: sni})
	return err
}

func (c *Client) FirewallRules(ctx context.Context) (*adminpb.ListFirewallRulesResponse, error) {
	return c.admin.ListFirewallRules(ctx, &adminpb.ListFirewallRulesRequest{})
}

func (c *Client) AddFirewallRule(ctx context.Context, value string) (*adminpb.FirewallRule, error) {
	r, err := c.admin.AddFirewallRule(ctx, &adminpb.AddFirewallRuleRequest{Value: value})
	if err != nil {
		return nil, err
	}
	return r.Rule, nil
}

func (c *Client) RemoveFirewallRule(ctx context.Context, value string) error {
	_, err := c.admin.RemoveFirewallRule(ctx, &adminpb.RemoveFirewallRuleRequest{Value: value})
	return err
}

func (c *Client) SetMaxConnections(ctx context.Context, listener string, n int64) error {
	_, err := c.admin.SetListenerMaxConnections(ctx, &adminpb.SetListenerMaxConnectionsRequest{Listener: listener, MaxConnections: n})
	return err
}

func (c *Client) Overrides(ctx context.Context) ([]*adminpb.Override, error) {
	r, err := c.admin.ListOverrides(ctx, &adminpb.ListOverridesRequest{})
	if err != nil {
		return nil, err
	}
	return r.Overrides, nil
}

// ClearOverride removes one override: kind "route" (listener, sni),
// "firewall" (value) or "listener" (listener).
func (c *Client) ClearOverride(ctx context.Context, kind, listener, sni, value string) error {
	_, err := c.admin.ClearOverride(ctx, &adminpb.ClearOverrideRequest{Kind: kind, Listener: listener, Sni: sni, Value: value})
	return err
}

func (c *Client) ClearAllOverrides(ctx context.Context) (int, error) {
	r, err := c.admin.ClearAllOverrides(ctx, &adminpb.ClearAllOverridesRequest{})
	if err != nil {
		return 0, err
	}
	return int(r.Cleared), nil
}

func (c *Client) Reload(ctx context.Context) (*adminpb.ReloadResponse, error) {
	return c.admin.Reload(ctx, &adminpb.ReloadRequest{})
}

// Snapshot streams a consistent copy of the daemon's database into w.
func (c *Client) Snapshot(ctx context.Context, w io.Writer) (int64, error) {
	// Returning before the end of the stream (w failed) must end the
	// call: an abandoned stream lives until ctx does, and the daemon's
	// call, blocked in flow control, keeps its staging copy of the
	// database on disk meanwhile.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.admin.Snapshot(ctx, &adminpb.SnapshotRequest{})
	if err != nil {
		return 0, err
	}
	var n int64
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		k, err := w.Write(chunk.Data)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
}
