package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"os/exec"

	"golang.org/x/sys/unix"
)

// cpuLayout says where the processes of a run may execute. In the shared
// layout (the default) nobody is pinned: the load generator, the backend
// and the proxy compete for every CPU, so a proxy's CPU time is taken
// from its own clients. In the split layout the load generator and the
// backend get the first half of the CPUs and the proxies the other half,
// as in production, where the proxy does not share cores with the
// clients and servers it relays for.
type cpuLayout struct {
	load, proxy []int // CPU numbers; both nil when shared
}

func (l cpuLayout) split() bool { return l.proxy != nil }

// proxyCPUCount is how many CPUs each proxy may use.
func (l cpuLayout) proxyCPUCount() int {
	if l.split() {
		return len(l.proxy)
	}
	return runtime.NumCPU()
}

func (l cpuLayout) String() string {
	if !l.split() {
		return "shared"
	}
	return "split: load generator and backend on CPU " + cpuList(l.load) + ", proxy on CPU " + cpuList(l.proxy)
}

// splitCPUs halves the CPUs this process may run on.
func splitCPUs() (cpuLayout, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return cpuLayout{}, fmt.Errorf("sched_getaffinity: %w", err)
	}
	var cpus []int
	for i := range len(set) * 64 {
		if set.IsSet(i) {
			cpus = append(cpus, i)
		}
	}
	if len(cpus) < 2 {
		return cpuLayout{}, fmt.Errorf("-cpus split needs at least 2 CPUs, this process may use %d", len(cpus))
	}
	half := len(cpus) / 2
	return cpuLayout{load: cpus[:half], proxy: cpus[half:]}, nil
}

// pinSelf confines every thread of this process to cpus and sizes
// GOMAXPROCS to match. Threads started later inherit the mask of the
// thread that starts them, so once all existing threads are pinned the
// process stays pinned; the passes repeat in case a thread was started
// by one not yet pinned while the list was being walked.
func pinSelf(cpus []int) error {
	var set unix.CPUSet
	for _, c := range cpus {
		set.Set(c)
	}
	pinned := map[int]bool{}
	for range 10 {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		fresh := 0
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || pinned[tid] {
				continue
			}
			if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("sched_setaffinity: %w", err)
			}
			pinned[tid] = true
			fresh++
		}
		if fresh == 0 {
			runtime.GOMAXPROCS(len(cpus))
			return nil
		}
	}
	return errors.New("sched_setaffinity: threads kept appearing")
}

// proxyArgv prefixes a proxy's command line with taskset(1) in the split
// layout. taskset execs in place, so the PID measured is the proxy's, and
// the proxy sees the narrowed CPU set from its first instruction (Go sizes
// GOMAXPROCS from it, HAProxy its thread count).
func (l cpuLayout) proxyArgv(argv []string) ([]string, error) {
	if !l.split() {
		return argv, nil
	}
	taskset, err := exec.LookPath("taskset")
	if err != nil {
		return nil, fmt.Errorf("-cpus split needs taskset (util-linux): %w", err)
	}
	return append([]string{taskset, "-c", cpuList(l.proxy)}, argv...), nil
}

func cpuList(cpus []int) string {
	s := make([]string, len(cpus))
	for i, c := range cpus {
		s[i] = strconv.Itoa(c)
	}
	return strings.Join(s, ",")
}
