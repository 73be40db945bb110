package main

// The tests of the command run the real daemon as a subprocess: the test
// binary re-executes itself with PORTCULLIS_TEST_DAEMON=1 and, instead of
// running tests, calls run() with the arguments in PORTCULLIS_TEST_ARGS.
// So signals, exit codes, the Unix socket left behind by SIGKILL and the
// SQLite file are all real, while the client side (ctl, check, version)
// runs in-process with buffers for stdout and stderr.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

const (
	envDaemon = "PORTCULLIS_TEST_DAEMON"
	// envArgs holds the daemon's arguments as a JSON array: an
	// environment variable cannot carry the NUL bytes a \x00-separated
	// list would need (exec refuses them).
	envArgs = "PORTCULLIS_TEST_ARGS"
)

func TestMain(m *testing.M) {
	if os.Getenv(envDaemon) == "1" {
		var args []string
		if err := json.Unmarshal([]byte(os.Getenv(envArgs)), &args); err != nil {
			fmt.Fprintf(os.Stderr, "portcullis test daemon: bad %s: %v\n", envArgs, err)
			os.Exit(3)
		}
		os.Exit(run(args, os.Stdout, os.Stderr))
	}
	goleak.VerifyTestMain(m)
}

// runCmd calls run in-process and returns the exit code and both outputs.
func runCmd(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestVersion(t *testing.T) {
	code, out, _ := runCmd("version")
	if code != 0 || out != "portcullis dev\n" {
		t.Fatalf("version: exit %d, stdout %q; want 0, %q", code, out, "portcullis dev\n")
	}
}

func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no command", nil, "usage:"},
		{"unknown command", []string{"frobnicate"}, `unknown command "frobnicate"`},
		{"bad serve flag", []string{"serve", "-nope"}, "flag provided but not defined"},
		{"bad log format", []string{"serve", "-log-format", "xml"}, "bad -log-format"},
		// Flag parsing stops at the first non-flag: the file named here,
		// and any flag after it, would be ignored without a word.
		{"serve without -config", []string{"serve", "examples/quickstart.toml"}, `unexpected argument "examples/quickstart.toml"`},
		{"serve flag after an argument", []string{"serve", "-pprof", "true", "-config", "x.toml"}, `unexpected argument "true"`},
		{"check without -config", []string{"check", "examples/quickstart.toml"}, `unexpected argument "examples/quickstart.toml"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runCmd(tc.args...)
			if code != 2 || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want 2 and %q", code, stderr, tc.want)
			}
		})
	}
	code, out, _ := runCmd("help")
	if code != 0 || !strings.Contains(out, "portcullis serve -config FILE") {
		t.Fatalf("help: exit %d, stdout %q", code, out)
	}
}

// TestSubcommandHelp: -h asks for the usage, as `portcullis -h` does, so
// it succeeds; a script or a packager's smoke test reads exit 2 as a
// broken binary.
func TestSubcommandHelp(t *testing.T) {
	for _, tc := range []struct{ cmd, want string }{
		{"serve", "-log-format"},
		{"check", "-config"},
		{"ctl", "snapshot FILE"},
	} {
		t.Run(tc.cmd, func(t *testing.T) {
			code, _, stderr := runCmd(tc.cmd, "-h")
			if code != 0 || !strings.Contains(stderr, tc.want) {
				t.Fatalf("%s -h: exit %d, stderr %q; want 0 and %q", tc.cmd, code, stderr, tc.want)
			}
		})
	}
}

var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}

// freeAddr returns a loopback address no one listens on right now, for
// a daemon to bind a moment later. The port is taken from below the
// kernel's ephemeral range when it can be: a port that port 0 would
// pick is also what outgoing connections (of this test or of others
// running in parallel) are given, and one of them may take it before
// the daemon binds. No port is handed out twice by one test binary.
func freeAddr(t testing.TB) string {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	if lo := ephemeralLow(); lo > 20000 {
		for range 100 {
			port := 10000 + rand.IntN(lo-10000)
			if handedOut.ports[port] {
				continue
			}
			ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err != nil {
				continue
			}
			ln.Close()
			handedOut.ports[port] = true
			return ln.Addr().String()
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// ephemeralLow is the first port of the kernel's ephemeral range, or 0
// when it is unknown.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(f[0])
	return n
}

// shortTempDir is t.TempDir unless its path is too long for a Unix
// socket (108 bytes on Linux, including the file name).
func shortTempDir(t testing.TB) string {
	dir := t.TempDir()
	if len(dir) < 80 {
		return dir
	}
	dir, err := os.MkdirTemp("", "pc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// testEnv is the directory of one daemon: its config file, Unix admin
// socket and database sit side by side, as the README recommends.
type testEnv struct {
	dir     string
	config  string
	sock    string
	db      string
	metrics string   // host:port of /metrics
	flags   []string // serve's flags beyond -config and -log-level
	admin   string   // [admin] keys beyond unix_socket
	starts  atomic.Int32
}

func newEnv(t testing.TB) *testEnv {
	t.Helper()
	dir := shortTempDir(t)
	return &testEnv{
		dir:     dir,
		config:  filepath.Join(dir, "portcullis.toml"),
		sock:    filepath.Join(dir, "portcullis.sock"),
		db:      filepath.Join(dir, "portcullis.db"),
		metrics: freeAddr(t),
	}
}

// writeConfig writes the config file: the daemon-wide sections, then
// body (listeners and routes). Relative paths are resolved next to it.
func (e *testEnv) writeConfig(t testing.TB, grace, body string) {
	t.Helper()
	writeFile(t, e.config, e.configText(grace, body))
}

// configText is the content writeConfig writes.
func (e *testEnv) configText(grace, body string) string {
	head := fmt.Sprintf(`shutdown_grace = %q

[admin]
unix_socket = "portcullis.sock"
%s
[metrics]
listen = %q

[state]
database = "portcullis.db"

`, grace, e.admin, e.metrics)
	return head + body
}

// writeFile replaces path atomically (write a temporary file, rename),
// as editors do, so a reader never sees half a file.
func writeFile(t testing.TB, path, content string) {
	t.Helper()
	tmp := path + ".tmp~"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// daemon is a running `portcullis serve` subprocess.
type daemon struct {
	cmd  *exec.Cmd
	logf string        // its stdout and stderr
	done chan struct{} // closed when it has exited
	err  error         // cmd.Wait's result, once done is closed
}

// startNoWait runs `portcullis serve -config e.config` like start but
// returns at once, without waiting for the daemon to finish starting.
func (e *testEnv) startNoWait(t testing.TB) *daemon {
	t.Helper()
	return e.launch(t, nil)
}

// launch is startNoWait with the daemon's output going through out when
// out is not nil.
func (e *testEnv) launch(t testing.TB, out *heldOutput) *daemon {
	t.Helper()
	n := e.starts.Add(1)
	d := &daemon{logf: filepath.Join(e.dir, fmt.Sprintf("daemon-%d.log", n)), done: make(chan struct{})}
	args, err := json.Marshal(append([]string{"serve", "-config", e.config, "-log-level", "debug"}, e.flags...))
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(d.logf)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close() // the child (or out's copier) has its own descriptor
	d.cmd = exec.Command(os.Args[0])
	// Under -race the runtime sleeps a second at exit (atexit_sleep_ms)
	// to let reports flush; the daemon's exit timing is what we test.
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	d.cmd.Env = append(os.Environ(), envDaemon+"=1", envArgs+"="+string(args), "GORACE="+gorace)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if out != nil {
		if err := out.copyTo(d.logf); err != nil {
			t.Fatal(err)
		}
		d.cmd.Stdout, d.cmd.Stderr = out.w, out.w
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.err = d.cmd.Wait()
		if out != nil {
			// The log file is complete once the copier has read the
			// rest: done means all the daemon wrote is in d.log().
			out.w.Close()
			<-out.copied
		}
		close(d.done)
	}()
	t.Cleanup(func() {
		if out != nil {
			out.release()
		}
		select {
		case <-d.done:
		default:
			d.cmd.Process.Kill()
			<-d.done
		}
		if t.Failed() {
			t.Logf("daemon %d log:\n%s", n, d.log())
		}
	})
	return d
}

// start runs `portcullis serve -config e.config` and returns once the
// daemon has logged its listeners (the last step of its startup) and
// the admin socket accepts connections; the proxy and metrics listeners
// are open before either. Its log (debug level) goes to a file in the
// env's directory and is printed if the test fails. The process is
// killed at the end of the test if it is still running.
func (e *testEnv) start(t testing.TB) *daemon {
	t.Helper()
	return e.waitStarted(t, e.startNoWait(t))
}

// waitStarted waits, as start does, until d has finished starting.
func (e *testEnv) waitStarted(t testing.TB, d *daemon) *daemon {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		// The "listening" lines come last in serve's startup, after the
		// admin socket is open and the config watcher started.
		if countLines(d.log(), "msg=listening") > 0 {
			if c, err := net.Dial("unix", e.sock); err == nil {
				c.Close()
				return d
			}
		}
		select {
		case <-d.done:
			t.Fatalf("daemon exited during start (%v); log:\n%s", d.err, d.log())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not open %s in time; log:\n%s", e.sock, d.log())
		}
	}
}

// heldOutput carries a daemon's stdout and stderr to its log file
// through a pipe the test can stop: hold stops the copying and fills the
// pipe, so the daemon's next log write blocks — as it would behind a log
// collector that stopped reading — until release. It holds the daemon at
// a point of its own (the next line it logs) without a test hook in it.
type heldOutput struct {
	r, w   *os.File   // the pipe; w is also the daemon's stdout and stderr
	gate   sync.Mutex // locked while held: the copier waits on it
	held   bool
	copied chan struct{} // closed when the copier has seen EOF; nil until copyTo
}

func newHeldOutput(t testing.TB) *heldOutput {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	o := &heldOutput{r: r, w: w}
	// For a daemon that was never launched: once launched, the daemon's
	// exit closes w and ends the copier.
	t.Cleanup(func() {
		if o.copied == nil {
			o.r.Close()
			o.w.Close()
		}
	})
	return o
}

// copyTo starts the copier, appending to the file at path.
func (o *heldOutput) copyTo(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	o.copied = make(chan struct{})
	go func() {
		defer close(o.copied)
		defer f.Close()
		defer o.r.Close()
		buf := make([]byte, 32<<10)
		for {
			// Wait while held, before reading too: a copier started
			// on a full pipe must leave it full.
			o.gate.Lock()
			o.gate.Unlock()
			n, err := o.r.Read(buf)
			o.gate.Lock() // a read that was waiting when hold began
			f.Write(buf[:n])
			o.gate.Unlock()
			if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return
			}
		}
	}()
	return nil
}

// hold stops the copying and fills the pipe with empty lines, so that
// the daemon's next write blocks. The fill makes the pipe non-blocking
// for a moment, which the daemon's end shares: the daemon must not be
// writing meanwhile (not started yet, or idle).
func (o *heldOutput) hold(t testing.TB) {
	t.Helper()
	o.gate.Lock()
	o.held = true
	// A read already waiting would take some of the fill after it is
	// done; the deadline ends it, and refuses any read until release.
	if err := o.r.SetReadDeadline(time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	fd := int(o.w.Fd())
	if err := syscall.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	defer syscall.SetNonblock(fd, false)
	// Page-sized writes, then single bytes for the last page: a write
	// of up to PIPE_BUF bytes is all or nothing, so a page-sized one can
	// fail while a log line would still fit.
	pad := bytes.Repeat([]byte("\n"), 4096)
	for _, size := range []int{len(pad), 1} {
		for {
			_, err := syscall.Write(fd, pad[:size])
			if err == syscall.EAGAIN {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
}

// release lets the copier drain the pipe, and the daemon write again.
func (o *heldOutput) release() {
	if o.held {
		o.held = false
		o.r.SetReadDeadline(time.Time{})
		o.gate.Unlock()
	}
}

// log returns everything the daemon has written so far.
func (d *daemon) log() string {
	b, _ := os.ReadFile(d.logf)
	return string(b)
}

func (d *daemon) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// running reports whether the process has not exited yet.
func (d *daemon) running() bool {
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

// wait waits up to limit for the process to exit and returns its exit
// code (-1 when a signal killed it).
func (d *daemon) wait(t testing.TB, limit time.Duration) int {
	t.Helper()
	select {
	case <-d.done:
		return d.cmd.ProcessState.ExitCode()
	case <-time.After(limit):
		t.Fatalf("daemon still running %v later", limit)
		return 0
	}
}

// stop sends SIGTERM and requires a clean exit.
func (d *daemon) stop(t testing.TB) {
	t.Helper()
	d.signal(t, syscall.SIGTERM)
	if code := d.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("daemon exited %d after SIGTERM, want 0", code)
	}
}

// waitLog waits until the log holds at least n lines containing every
// one of parts, and returns the log.
func (d *daemon) waitLog(t testing.TB, n int, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		exited := !d.running()
		log := d.log()
		if countLines(log, parts...) >= n {
			return log
		}
		if exited {
			t.Fatalf("daemon exited (%v) without logging %d line(s) with %q; log:\n%s", d.err, n, parts, log)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %d log line(s) with %q in time; log:\n%s", n, parts, log)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func countLines(log string, parts ...string) int {
	n := 0
lines:
	for line := range strings.Lines(log) {
		for _, p := range parts {
			if !strings.Contains(line, p) {
				continue lines
			}
		}
		n++
	}
	return n
}

// waitRefused dials addr until the connection is refused: the listener
// has been closed.
func waitRefused(t testing.TB, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("dial %s: %v, want connection refused", addr, err)
			}
			return
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s still accepts connections", addr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
