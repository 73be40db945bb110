package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// child is a process the benchmark started. It is stopped by its own PID
// (and its workers, if SIGKILL is needed, by theirs) and nothing else:
// never by name, never by process group.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed once the process has been reaped
	waitErr error
}

// startChild runs argv with stdout and stderr going to logPath. The
// child gets its own process group so a terminal's ^C reaches only the
// benchmark, which then stops it in order; Pdeathsig kills it should the
// benchmark itself die without running its cleanup.
func startChild(name, logPath string, argv ...string) (*child, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: pdeathsig(name)}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		c.waitErr = cmd.Wait()
		f.Close()
		close(c.done)
	}()
	return c, nil
}

// pdeathsig is the signal a child gets should the benchmark die without
// running its cleanup. SIGKILL takes a single-process proxy down; it
// would take nginx's master down alone and leave its workers, which are
// not our children and get no parent-death signal from nginx, serving on
// the port. SIGTERM makes the master stop its workers, then exit.
func pdeathsig(name string) syscall.Signal {
	if name == "nginx" {
		return syscall.SIGTERM
	}
	return syscall.SIGKILL
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM to the child's PID, and SIGKILL if it has not
// exited three seconds later.
func (c *child) stop() {
	if !c.alive() {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		return
	case <-time.After(3 * time.Second):
	}
	fmt.Fprintf(os.Stderr, "bench: %s (pid %d) ignored SIGTERM; killing it\n", c.name, c.pid())
	// A master's workers are this child's own children (nginx): they go
	// too, by the PIDs read before their parent is gone.
	for _, pid := range childPIDs(c.pid()) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	c.cmd.Process.Kill()
	select {
	case <-c.done:
	case <-time.After(2 * time.Second):
		fmt.Fprintf(os.Stderr, "bench: %s (pid %d) did not exit after SIGKILL\n", c.name, c.pid())
	}
}

// exitError describes a child that is gone, with the end of its log.
func (c *child) exitError() error {
	return fmt.Errorf("%s (pid %d) exited: %v\n--- end of its output ---\n%s", c.name, c.pid(), c.waitErr, c.logTail())
}

func (c *child) logTail() string {
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return err.Error()
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return string(bytes.TrimSpace(b))
}

// waitListening polls addr until a TCP connect succeeds, the child
// exits, or the timeout passes.
func waitListening(ctx context.Context, c *child, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if !c.alive() {
			return c.exitError()
		}
		conn, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
		if err == nil {
			conn.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: nothing accepting on %s after %v: %v\n--- its output ---\n%s", c.name, addr, timeout, err, c.logTail())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// freePorts reserves n distinct loopback ports by listening on port 0,
// then releases them for the proxies to bind. Another process could
// take one in between; on a benchmark machine that is unlikely, and the
// proxy then fails to start with a clear error.
func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// raiseNofile sets the soft RLIMIT_NOFILE to the hard limit, after
// raising the hard limit to want first when want is above it (that needs
// CAP_SYS_RESOURCE). Calling Setrlimit explicitly also makes os/exec pass
// the raised limit on to the proxies the benchmark starts.
func raiseNofile(want uint64) (syscall.Rlimit, error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return r, err
	}
	if want > r.Max {
		up := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up); err != nil {
			fmt.Fprintf(os.Stderr, "bench: cannot raise the hard RLIMIT_NOFILE to %d (%v); keeping %d\n", want, err, r.Max)
		} else {
			return up, nil
		}
	}
	r.Cur = r.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return r, err
	}
	return r, nil
}

// The readers below take numbers from /proc/PID; pid 0 is not special,
// use os.Getpid() for the benchmark itself.

// rssKiB is VmRSS from /proc/PID/status.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest) // "1234 kB"
			if len(f) != 2 || f[1] != "kB" {
				break
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS line", pid)
}

// fdCount counts /proc/PID/fd entries and, among them, pipe ends.
func fdCount(pid int) (fds, pipes int, err error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, err
	}
	for _, e := range ents {
		target, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue // closed between ReadDir and Readlink
		}
		fds++
		if strings.HasPrefix(target, "pipe:") {
			pipes++
		}
	}
	return fds, pipes, nil
}

// clockTick is USER_HZ, the unit of /proc/PID/stat times. The kernel
// exports 100 on every architecture Go runs Linux on, whatever CONFIG_HZ
// is.
const clockTick = 100

// cpuSeconds is utime+stime of all the process's threads, from
// /proc/PID/stat.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may itself hold
	// spaces or parentheses: count fields from the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc/PID/stat")
	}
	f := strings.Fields(string(b[i+1:])) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, errors.New("short /proc/PID/stat")
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return float64(utime+stime) / clockTick, nil
}

// nofileSoft is the soft "Max open files" limit from /proc/PID/limits.
func nofileSoft(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) < 1 {
				break
			}
			if f[0] == "unlimited" {
				return 1 << 62, nil
			}
			return strconv.ParseUint(f[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/limits: no Max open files line", pid)
}

// childPIDs lists the processes whose parent is pid, from /proc/*/stat.
func childPIDs(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var kids []int
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:])) // f[1] is field 4 (ppid)
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			kids = append(kids, n)
		}
	}
	return kids
}

// The tree readers below sum a proxy process and its direct children:
// nginx serves from worker processes its master forks, and their CPU,
// memory and descriptors are the proxy's. A single-process proxy is a
// tree of one.

func treeCPUSeconds(pid int) (float64, error) { return sumTree(pid, cpuSeconds) }

func treeSleeps(pid int) (int64, error) { return sumTree(pid, sleeps) }

// sleeps counts the times pid's threads gave up the CPU to wait
// (voluntary context switches: a futex, epoll_wait, a timer sleep).
// Each is a wakeup paid later; a process that waits on a slow peer
// sleeps and wakes more often for the same work. A thread that has
// exited no longer counts, which the runtimes measured here rarely do.
func sleeps(pid int) (int64, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var total int64
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		if err != nil {
			continue // exited meanwhile
		}
		for line := range strings.Lines(string(b)) {
			if rest, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
				n, err := strconv.ParseInt(strings.TrimSpace(rest), 10, 64)
				if err != nil {
					return 0, err
				}
				total += n
				break
			}
		}
	}
	return total, nil
}

func treeRSSKiB(pid int) (int64, error) { return sumTree(pid, rssKiB) }

// sumTree adds read(pid) and read of each child; a child that exits
// while it is read counts as nothing.
func sumTree[T int64 | float64](pid int, read func(int) (T, error)) (T, error) {
	total, err := read(pid)
	if err != nil {
		return 0, err
	}
	for _, kid := range childPIDs(pid) {
		if v, err := read(kid); err == nil {
			total += v
		}
	}
	return total, nil
}

func treeFDCount(pid int) (fds, pipes int, err error) {
	if fds, pipes, err = fdCount(pid); err != nil {
		return 0, 0, err
	}
	for _, kid := range childPIDs(pid) {
		if f, p, err := fdCount(kid); err == nil {
			fds, pipes = fds+f, pipes+p
		}
	}
	return fds, pipes, nil
}

// treeNofileSoft is the lowest soft descriptor limit in the tree: the
// process that holds the connections (a worker, for nginx) is the one
// that runs out.
func treeNofileSoft(pid int) (uint64, error) {
	lowest, err := nofileSoft(pid)
	if err != nil {
		return 0, err
	}
	for _, kid := range childPIDs(pid) {
		if n, err := nofileSoft(kid); err == nil {
			lowest = min(lowest, n)
		}
	}
	return lowest, nil
}
