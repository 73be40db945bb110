package rpc_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/rpc"
	"github.com/portcullis/portcullis/testnet"
)

// adminOnly parses a config with only an [admin] section; the socket
// tests need no proxy behind the API, only its health service.
func adminOnly(t *testing.T, dir, admin string) *config.Config {
	t.Helper()
	cfg, err := config.Parse(filepath.Join(dir, "portcullis.toml"), []byte("[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[admin]\n"+admin))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func listenAdmin(cfg *config.Config) (*rpc.Running, error) {
	return rpc.Listen(cfg, rpc.NewServer(rpc.Options{}), slog.New(slog.DiscardHandler))
}

// wantServing dials target and expects the health service to answer.
func wantServing(t *testing.T, target string, o rpc.DialOptions) {
	t.Helper()
	cli, err := rpc.Dial(target, o)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if st, err := cli.Health(ctx); err != nil || st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health via %s: %v, %v", target, st, err)
	}
}

func wantSocket0600(t *testing.T, path string) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s: mode %v, want a socket with mode 0600", path, fi.Mode())
	}
}

func TestUnixSocketMode(t *testing.T) {
	h := newHarness(t, fileConfig{})
	if h.sock != filepath.Join(h.dir, "admin.sock") {
		t.Errorf("socket at %s, want it next to the config file", h.sock)
	}
	wantSocket0600(t, h.sock)
	if addrs := h.run.Addrs(); len(addrs) != 1 || addrs[0].String() != h.sock {
		t.Errorf("Addrs %v, want the socket only", addrs)
	}
	// Stop removes the socket file.
	h.stop()
	if _, err := os.Lstat(h.sock); !os.IsNotExist(err) {
		t.Errorf("socket after Stop: %v, want it gone", err)
	}
	h.start()
	wantSocket0600(t, h.sock)
}

func TestUnixSocketStale(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "admin.sock")
	// What a daemon killed with SIGKILL leaves: a socket file nobody
	// listens on.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}

	run, err := listenAdmin(adminOnly(t, dir, `unix_socket = "admin.sock"`))
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer run.Stop()
	wantSocket0600(t, path)
	wantServing(t, "unix:"+path, rpc.DialOptions{})
}

func TestUnixSocketInUse(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "admin.sock")
	live, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()

	run, err := listenAdmin(adminOnly(t, dir, `unix_socket = "admin.sock"`))
	if err == nil {
		run.Stop()
		t.Fatal("Listen took over a socket a live process serves")
	}
	if !strings.Contains(err.Error(), "in use") || !strings.Contains(err.Error(), "admin.unix_socket") {
		t.Errorf("error %q, want it to say the socket is in use and name admin.unix_socket", err)
	}
	// The live process keeps its socket.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the live socket was disturbed: %v", err)
	}
	c.Close()
}

func TestUnixSocketPathNotASocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "admin.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	run, err := listenAdmin(adminOnly(t, dir, `unix_socket = "admin.sock"`))
	if err == nil {
		run.Stop()
		t.Fatal("Listen replaced a regular file")
	}
	if !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("error %q, want it to say the path is not a socket", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
		t.Errorf("the file was touched: %q, %v", b, err)
	}
}

// TestListenFailureClosesWhatItOpened: when the TCP half of [admin]
// fails, the Unix socket already opened is closed and removed, and a
// Listen right after it (say, with the certificate fixed) keeps its
// socket. Before Running.Stop closed the listeners itself, the Serve
// goroutine of the failed Listen closed its listener whenever it got to
// run — unlinking the path, by then the new socket's.
func TestListenFailureClosesWhatItOpened(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "admin.sock")
	bad := adminOnly(t, dir, fmt.Sprintf("unix_socket = %q\nlisten = \"127.0.0.1:0\"\ntls_cert = \"missing.pem\"\ntls_key = \"missing-key.pem\"\n", "admin.sock"))
	good := adminOnly(t, dir, `unix_socket = "admin.sock"`)
	for i := range 20 {
		run, err := listenAdmin(bad)
		if err == nil {
			run.Stop()
			t.Fatal("Listen with a missing certificate succeeded")
		}
		if !strings.Contains(err.Error(), "admin.tls_cert") {
			t.Fatalf("error %q, want it to name admin.tls_cert", err)
		}
		if _, err := os.Lstat(path); !os.IsNotExist(err) {
			t.Fatalf("round %d: socket left by the failed Listen: %v", i, err)
		}

		run, err = listenAdmin(good)
		if err != nil {
			t.Fatalf("round %d: Listen after a failed one: %v", i, err)
		}
		// Once the failed Listen's Serve goroutine has run, the new
		// socket must still be there.
		testnet.WaitFor(t, "the failed Listen's Serve goroutine to exit", func() bool { return grpcServeGoroutines() <= 1 })
		if _, err := os.Lstat(path); err != nil {
			run.Stop()
			t.Fatalf("round %d: the new socket was unlinked: %v", i, err)
		}
		wantServing(t, "unix:"+path, rpc.DialOptions{})
		run.Stop()
	}
}

// grpcServeGoroutines counts goroutines inside grpc.(*Server).Serve.
func grpcServeGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "google.golang.org/grpc.(*Server).Serve(") {
			count++
		}
	}
	return count
}

// TestSnapshotWithoutStore: a service wired without a database answers
// Snapshot with an error instead of crashing the process.
func TestSnapshotWithoutStore(t *testing.T) {
	dir := t.TempDir()
	run, err := listenAdmin(adminOnly(t, dir, `unix_socket = "admin.sock"`))
	if err != nil {
		t.Fatal(err)
	}
	defer run.Stop()
	cli, err := rpc.Dial("unix:"+filepath.Join(dir, "admin.sock"), rpc.DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = cli.Snapshot(ctx, io.Discard)
	wantCode(t, err, codes.FailedPrecondition)
}

// TestUnixSocketPathNeedingEscape: the client reaches a socket whatever
// its path holds. grpc reads "unix:PATH" as a URL, so a '#' or '?' cut
// the path short and a '%' made it unparsable, though the daemon binds
// such paths (and the store opens databases in them) without trouble.
func TestUnixSocketPathNeedingEscape(t *testing.T) {
	for _, name := range []string{"a#b", "a?b", "50%", "a%20b", "a b"} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), name)
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			run, err := listenAdmin(adminOnly(t, dir, `unix_socket = "admin.sock"`))
			if err != nil {
				t.Fatal(err)
			}
			defer run.Stop()
			wantServing(t, "unix:"+filepath.Join(dir, "admin.sock"), rpc.DialOptions{})
		})
	}
}
