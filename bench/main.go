// Command bench is the whole-proxy load benchmark: it runs portcullis
// (and HAProxy, when installed) on loopback in front of an in-process TLS
// backend and compares bulk throughput, new-connection rate, CPU cost and
// idle-connection memory with a direct connection to the backend.
//
//	go run ./bench -duration 5s -json bench/results/run.json
//
// It stops by itself after about a minute and a half, and on every exit
// path (error, ^C) stops the processes it started, by PID, and removes
// its temporary directory. See bench/README.md for how to read the table.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	duration time.Duration
	idle     int
	haproxy  string
	nginx    string
	jsonOut  string
	streams  int
	workers  int
	rounds   int
	bin      string
	nofile   uint64
	procs    int
	godebug  string
	phases   map[string]bool
	cpus     cpuLayout

	haproxySplice bool
	floor         bool
	compare       string
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	var o options
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "length of each timed phase per target")
	fs.IntVar(&o.idle, "idle", 5000, "idle connections to park on each proxy")
	fs.StringVar(&o.haproxy, "haproxy", "auto", "auto: also measure HAProxy when `haproxy` is on PATH; off: never")
	fs.StringVar(&o.nginx, "nginx", "auto", "auto: also measure nginx's stream proxy when `nginx` is on PATH (or in /usr/sbin) with its stream module; off: never")
	fs.StringVar(&o.jsonOut, "json", "", "also write the results as JSON to this file")
	fs.IntVar(&o.streams, "streams", 8, "parallel streams in the second bulk phase")
	fs.IntVar(&o.workers, "workers", 8, "concurrent workers in the connection-rate phase")
	fs.IntVar(&o.rounds, "rounds", 5, "split each bulk and rate phase into this many rounds, alternating the targets")
	fs.StringVar(&o.bin, "bin", "", "portcullis binary to run (default: go build the module into the temp dir)")
	fs.StringVar(&o.compare, "compare", "", "also measure this second portcullis binary, as target portcullis-b: an A/B of a change in one run, alternating rounds like every target")
	fs.IntVar(&o.procs, "proxy-procs", 0, "run portcullis with GOMAXPROCS set to this (0: the runtime's default)")
	fs.StringVar(&o.godebug, "proxy-godebug", "", "run portcullis with GODEBUG set to this")
	fs.Uint64Var(&o.nofile, "nofile", 0, "try to raise the hard RLIMIT_NOFILE to this first (needs CAP_SYS_RESOURCE; 0: keep it)")
	fs.BoolVar(&o.haproxySplice, "haproxy-splice", false, "give HAProxy `option splice-auto`, which lets it splice(2) transfers it judges worth it")
	fs.BoolVar(&o.floor, "floor", false, "also measure bench/floor's two minimal Go relays (goroutines, epoll): what any Go relay pays on this machine, without portcullis's features")
	cpus := fs.String("cpus", "shared", "shared: every process may use every CPU; split: load generator and backend on the first half of the CPUs, proxies on the rest")
	phases := fs.String("phases", "idle,bulk,rate", "comma-separated phases to run: idle, bulk, rate")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	o.phases = map[string]bool{}
	for _, ph := range strings.Split(*phases, ",") {
		switch ph = strings.TrimSpace(ph); ph {
		case "idle", "bulk", "rate":
			o.phases[ph] = true
		default:
			fmt.Fprintf(os.Stderr, "bench: unknown phase %q in -phases (want idle, bulk, rate)\n", ph)
			return 2
		}
	}
	switch {
	case o.haproxy != "auto" && o.haproxy != "off":
		fmt.Fprintln(os.Stderr, "bench: -haproxy must be auto or off")
		return 2
	case o.nginx != "auto" && o.nginx != "off":
		fmt.Fprintln(os.Stderr, "bench: -nginx must be auto or off")
		return 2
	case o.duration <= 0 || o.idle < 0 || o.streams < 1 || o.workers < 1 || o.rounds < 1:
		fmt.Fprintln(os.Stderr, "bench: -duration, -streams, -workers and -rounds must be positive, -idle not negative")
		return 2
	case o.duration/time.Duration(o.rounds) < 200*time.Millisecond:
		fmt.Fprintln(os.Stderr, "bench: -duration / -rounds must be at least 200ms")
		return 2
	case fs.NArg() > 0:
		fmt.Fprintf(os.Stderr, "bench: unexpected arguments %q\n", fs.Args())
		return 2
	}
	switch *cpus {
	case "shared":
	case "split":
		l, err := splitCPUs()
		if err == nil {
			err = pinSelf(l.load)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
		o.cpus = l
	default:
		fmt.Fprintln(os.Stderr, "bench: -cpus must be shared or split")
		return 2
	}

	// The first ^C or SIGTERM cancels the run, whose deferred cleanup
	// stops the children; a second one gets the default action (the
	// children then die by their Pdeathsig).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		select {
		case s := <-sigs:
			signal.Stop(sigs)
			fmt.Fprintf(os.Stderr, "\nbench: %v: stopping and cleaning up (again to abort)\n", s)
			cancel()
		case <-ctx.Done():
		}
	}()

	var cl cleanup
	defer cl.run()
	rep, err := benchmark(ctx, o, &cl)
	if rep != nil && len(rep.Targets) > 0 && ctx.Err() == nil {
		printTable(os.Stdout, rep)
		if o.jsonOut != "" {
			if werr := writeJSON(o.jsonOut, rep); werr != nil {
				fmt.Fprintln(os.Stderr, "bench:", werr)
				return 1
			}
			fmt.Printf("\nJSON written to %s\n", o.jsonOut)
		}
	}
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "bench: interrupted; no results")
		return 130
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	return 0
}

// cleanup runs registered functions in reverse order, once.
type cleanup struct{ fns []func() }

func (c *cleanup) add(f func()) { c.fns = append(c.fns, f) }

func (c *cleanup) run() {
	for i := len(c.fns) - 1; i >= 0; i-- {
		c.fns[i]()
	}
	c.fns = nil
}

// target is one address the load is run against.
type target struct {
	name string
	addr string
	proc *child // the proxy process; nil for direct
	res  *targetResult

	metricsURL string // Go targets (portcullis, the floors) only
}

const haproxyMaxconn = 20000

func benchmark(ctx context.Context, o options, cl *cleanup) (*report, error) {
	started := time.Now()
	lim, err := raiseNofile(o.nofile)
	if err != nil {
		return nil, fmt.Errorf("RLIMIT_NOFILE: %w", err)
	}
	rep := &report{
		Started:       started,
		GoVersion:     runtime.Version(),
		Platform:      runtime.GOOS + "/" + runtime.GOARCH,
		CPUs:          runtime.NumCPU(),
		CPULayout:     o.cpus.String(),
		PortcullisEnv: strings.Join(portcullisEnv(o.procs, o.godebug), " "),
		Duration:      o.duration.String(),
		Streams:       o.streams,
		Workers:       o.workers,
		Rounds:        o.rounds,
		IdleRequested: o.idle,
		Nofile:        lim.Cur,
	}

	dir, err := os.MkdirTemp("", "portcullis-bench-")
	if err != nil {
		return nil, err
	}
	cl.add(func() { os.RemoveAll(dir) })

	bin := o.bin
	if bin == "" {
		bin = filepath.Join(dir, "portcullis")
		fmt.Fprintln(os.Stderr, "bench: building portcullis ...")
		build := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/portcullis/portcullis")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return nil, fmt.Errorf("go build (run from inside the repository, or pass -bin): %w", err)
		}
	}
	if out, err := exec.CommandContext(ctx, bin, "version").Output(); err == nil {
		rep.Portcullis = strings.TrimSpace(string(out))
	}

	p, err := newPKI()
	if err != nil {
		return nil, err
	}
	be, err := startBackend(p.cert)
	if err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	cl.add(be.close)

	targets := []*target{{name: "direct", addr: be.addr()}}

	bins := []string{bin}
	if o.compare != "" {
		bins = append(bins, o.compare)
	}
	for i, bin := range bins {
		name := "portcullis"
		if i > 0 {
			name = "portcullis-b"
		}
		pc, addr, metricsAddr, err := startPortcullis(ctx, name, dir, bin, be.addr(), o.procs, o.godebug, o.cpus)
		if pc != nil {
			cl.add(pc.stop)
		}
		if err != nil {
			return nil, err
		}
		targets = append(targets, &target{name: name, addr: addr, proc: pc, metricsURL: "http://" + metricsAddr + "/metrics"})
	}

	if o.haproxy == "off" {
		rep.HAProxy = "HAProxy not run (-haproxy off)"
	} else if path, err := exec.LookPath("haproxy"); err != nil {
		rep.HAProxy = "HAProxy not run (haproxy not on PATH)"
	} else {
		rep.HAProxy = haproxyVersion(ctx, path)
		// HAProxy wants 2 descriptors per connection, and with splice
		// another 2 for each of its maxconn/4 pipes.
		perConn, need := 2.0, "2*maxconn"
		if o.haproxySplice {
			perConn, need = 2.5, "2.5*maxconn (splice pipes included)"
			rep.HAProxy += " with option splice-auto"
		}
		rep.HAProxyMaxconn = min(haproxyMaxconn, int(float64(int(lim.Cur)-64)/perConn))
		if rep.HAProxyMaxconn < haproxyMaxconn {
			rep.Notes = append(rep.Notes, fmt.Sprintf("haproxy maxconn lowered from %d to %d: HAProxy refuses to start unless RLIMIT_NOFILE (%d) covers %s", haproxyMaxconn, rep.HAProxyMaxconn, lim.Cur, need))
		}
		hc, addr, err := startHAProxy(ctx, dir, path, be.addr(), rep.HAProxyMaxconn, o.haproxySplice, o.cpus)
		if targets, err = addReference(ctx, cl, rep, targets, "haproxy", &rep.HAProxy, hc, addr, err); err != nil {
			return nil, err
		}
	}

	if o.nginx == "off" {
		rep.Nginx = "nginx not run (-nginx off)"
	} else if path, err := findNginx(); err != nil {
		rep.Nginx = "nginx not run (" + err.Error() + ")"
	} else {
		rep.Nginx = nginxVersion(ctx, path)
		nc, addr, err := startNginx(ctx, dir, path, be.addr(), lim.Cur, o.cpus)
		if targets, err = addReference(ctx, cl, rep, targets, "nginx", &rep.Nginx, nc, addr, err); err != nil {
			return nil, err
		}
	}

	if o.floor {
		if targets, err = addFloors(ctx, cl, dir, be.addr(), o.cpus, targets); err != nil {
			return nil, err
		}
	}

	for _, t := range targets {
		if err := ping(ctx, p, t.addr); err != nil {
			return nil, fmt.Errorf("%s: routing check (TLS to %s with SNI %s): %w", t.name, t.addr, serverName, err)
		}
		t.res = &targetResult{Name: t.name, Addr: t.addr}
		if t.proc != nil {
			t.res.PID = t.proc.pid()
			t.res.ProxyCPU = &cpuUse{}
		}
		t.res.LoadCPU = &cpuUse{}
		rep.Targets = append(rep.Targets, t.res)
	}
	rep.LoadAvgStart = loadAvg()
	printHeader(os.Stderr, rep)

	// Idle memory runs first, on freshly started proxies: heap that the
	// later phases grow and free would otherwise absorb the idle
	// connections and hide their cost.
	if o.phases["idle"] && o.idle > 0 {
		fmt.Fprintf(os.Stderr, "\n[idle] %d connections per proxy\n", o.idle)
	}
	for _, t := range targets {
		if t.proc == nil || o.idle == 0 || !o.phases["idle"] {
			continue
		}
		if err := alive(t); err != nil {
			return rep, err
		}
		r, err := runIdle(ctx, p, be, t.addr, t.proc.pid(), o.idle, rep.Nofile, t.metricsURL)
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
		switch {
		case errors.Is(err, errSkipped):
			t.res.Errors = append(t.res.Errors, "idle: "+err.Error())
			fmt.Fprintf(os.Stderr, "  %-10s %v\n", t.name, err)
		case err != nil:
			t.res.Errors = append(t.res.Errors, "idle: "+err.Error())
			fmt.Fprintf(os.Stderr, "  %-10s error: %v\n", t.name, err)
		default:
			t.res.Idle = &r
			fmt.Fprintf(os.Stderr, "  %-10s %d held: %+.1f KiB RSS, %.2f fds (%.2f pipe) per connection\n", t.name, r.Held, r.KiBPerConn, r.FDsPerConn, r.PipesPerConn)
		}
		pause(ctx)
	}

	round := o.duration / time.Duration(o.rounds)
	// CPU per GiB pools both bulk phases; a target that failed a round
	// of either has a different mix of 1-stream and N-stream bytes than
	// direct (or none of one), so, like its throughput, it gets none.
	bulkCPU, bulkFailed := phaseCPU{}, map[*target]bool{}
	for _, streams := range []int{1, o.streams} {
		if !o.phases["bulk"] {
			break
		}
		fmt.Fprintf(os.Stderr, "\n[bulk] %d stream(s), %d rounds of %v per target\n", streams, o.rounds, round)
		failed, err := interleave(ctx, targets, o.rounds, func(t *target) error {
			var r bulkResult
			pcpu, lcpu, err := measureCPU(t, func() (err error) {
				r, err = runBulk(ctx, p, t.addr, streams, round)
				return err
			})
			if err != nil {
				return fmt.Errorf("bulk %d: %w", streams, err)
			}
			total := &t.res.Bulk1
			if streams != 1 {
				total = &t.res.BulkN
			}
			if *total == nil {
				*total = &bulkResult{Streams: streams}
			}
			(*total).add(r)
			bulkCPU.add(t, pcpu, lcpu, r.AllByte)
			return nil
		})
		if err != nil {
			return rep, err
		}
		for t := range failed { // a partial total is not comparable
			bulkFailed[t] = true
			if streams == 1 {
				t.res.Bulk1 = nil
			} else {
				t.res.BulkN = nil
			}
		}
		for _, t := range targets {
			if r := t.res.bulk(streams); r != nil {
				fmt.Fprintf(os.Stderr, "  %-10s %8.1f MiB/s\n", t.name, r.MiBps)
			}
		}
	}

	for t, c := range bulkCPU {
		if !bulkFailed[t] {
			t.res.addBulkCPU(c.proxy, c.load, c.units)
		}
	}

	if o.phases["rate"] {
		if err := runRatePhase(ctx, o, p, targets, round); err != nil {
			return rep, err
		}
	}

	for _, t := range targets {
		if err := alive(t); err != nil {
			return rep, err
		}
	}
	rep.Seconds = time.Since(started).Seconds()
	rep.LoadAvgEnd = loadAvg()
	return rep, nil
}

// runRatePhase measures new TLS connections per second against every
// target, in alternating rounds, and adds the results to each target.
func runRatePhase(ctx context.Context, o options, p *pki, targets []*target, round time.Duration) error {
	fmt.Fprintf(os.Stderr, "\n[connection rate] %d workers, %d rounds of %v per target\n", o.workers, o.rounds, round)
	rateCPU := phaseCPU{}
	failed, err := interleave(ctx, targets, o.rounds, func(t *target) error {
		var r rateResult
		pcpu, lcpu, err := measureCPU(t, func() (err error) {
			r, err = runRate(ctx, p, t.addr, o.workers, round)
			return err
		})
		if err != nil {
			return fmt.Errorf("connection rate: %w", err)
		}
		if t.res.Rate == nil {
			t.res.Rate = &rateResult{Workers: o.workers}
		}
		t.res.Rate.add(r)
		rateCPU.add(t, pcpu, lcpu, r.Conns)
		return nil
	})
	if err != nil {
		return err
	}
	for t := range failed {
		t.res.Rate = nil
	}
	for t, c := range rateCPU {
		if !failed[t] { // like the rate, a partial total is dropped
			t.res.addRateCPU(c.proxy, c.load, c.units)
		}
	}
	for _, t := range targets {
		if r := t.res.Rate; r != nil {
			if r.Errors > 0 {
				t.res.Errors = append(t.res.Errors, fmt.Sprintf("connection rate: %d failed connections, first: %s", r.Errors, r.FirstErr))
			}
			fmt.Fprintf(os.Stderr, "  %-10s %8.0f connections/s (%d failed)\n", t.name, r.PerSec, r.Errors)
		}
	}
	return nil
}

// interleave runs one measurement per target per round, rotating the
// order each round, so that load from elsewhere on the machine that comes
// and goes during the phase is spread over all targets instead of landing
// on whichever ran last. A target whose measurement fails is recorded
// and left out of the rest of the phase; a proxy that died, or ^C, ends
// the run. The failed targets are returned so their partial totals can
// be dropped.
func interleave(ctx context.Context, targets []*target, rounds int, measure func(*target) error) (failed map[*target]bool, err error) {
	failed = make(map[*target]bool)
	for r := range rounds {
		for i := range targets {
			t := targets[(r+i)%len(targets)]
			if failed[t] {
				continue
			}
			if err := alive(t); err != nil {
				return nil, err
			}
			err := measure(t)
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if err != nil {
				failed[t] = true
				t.res.Errors = append(t.res.Errors, err.Error())
				fmt.Fprintf(os.Stderr, "  %-10s error: %v\n", t.name, err)
				if perr := alive(t); perr != nil {
					return nil, perr
				}
			}
			pause(ctx)
		}
	}
	return failed, nil
}

// phaseCPU holds the CPU seconds (proxy, load generator) and units of
// work (bytes, connections) of each target's rounds until it is known
// which targets completed every round.
type phaseCPU map[*target]*struct {
	proxy, load usage
	units       int64
}

func (m phaseCPU) add(t *target, proxy, load usage, units int64) {
	c := m[t]
	if c == nil {
		c = &struct {
			proxy, load usage
			units       int64
		}{}
		m[t] = c
	}
	c.proxy.cpu += proxy.cpu
	c.proxy.sleeps += proxy.sleeps
	c.load.cpu += load.cpu
	c.load.sleeps += load.sleeps
	c.units += units
}

func alive(t *target) error {
	if t.proc != nil && !t.proc.alive() {
		return t.proc.exitError()
	}
	return nil
}

// pause lets the previous measurement's connections drain before the
// next one starts.
func pause(ctx context.Context) {
	select {
	case <-ctx.Done():
	case <-time.After(200 * time.Millisecond):
	}
}

// measureCPU runs fn and returns the CPU seconds the target's proxy
// process (0 for direct) and this process (client and backend) used
// meanwhile, including a short tail for connection teardown.
// usage is what a process spent on a piece of work: CPU seconds and
// sleeps (see sleeps).
type usage struct {
	cpu    float64
	sleeps int64
}

func (u usage) minus(v usage) usage { return usage{u.cpu - v.cpu, u.sleeps - v.sleeps} }

// measureCPU runs fn and returns what the target's proxy process (zero
// for direct) and this process spent meanwhile.
func measureCPU(t *target, fn func() error) (proxy, load usage, err error) {
	self := os.Getpid()
	proxySample := func() (usage, error) {
		if t.proc == nil {
			return usage{}, nil
		}
		c, err := treeCPUSeconds(t.proc.pid())
		if err != nil {
			return usage{}, err
		}
		n, err := treeSleeps(t.proc.pid())
		return usage{c, n}, err
	}
	selfSample := func() (usage, error) {
		c, err := cpuSeconds(self)
		if err != nil {
			return usage{}, err
		}
		n, err := sleeps(self)
		return usage{c, n}, err
	}
	p0, err := proxySample()
	if err != nil {
		return usage{}, usage{}, err
	}
	l0, err := selfSample()
	if err != nil {
		return usage{}, usage{}, err
	}
	if err := fn(); err != nil {
		return usage{}, usage{}, err
	}
	time.Sleep(200 * time.Millisecond)
	// This process first: scanning /proc for a proxy's workers is work
	// of its own that must not count as the load generator's.
	l1, err := selfSample()
	if err != nil {
		return usage{}, usage{}, err
	}
	p1, err := proxySample()
	if err != nil {
		return usage{}, usage{}, err
	}
	return p1.minus(p0), l1.minus(l0), nil
}

// addReference takes the outcome of starting a reference proxy (HAProxy,
// nginx): once started, it is stopped at cleanup whatever happens; if it
// failed to start, the run goes on without it and the report says why
// (label is the report's line for it). Only a cancelled run is an error.
func addReference(ctx context.Context, cl *cleanup, rep *report, targets []*target, name string, label *string, c *child, addr string, err error) ([]*target, error) {
	if c != nil {
		cl.add(c.stop)
	}
	switch {
	case ctx.Err() != nil:
		return targets, ctx.Err()
	case err != nil:
		*label += " (failed to start, not measured)"
		rep.Notes = append(rep.Notes, name+": "+err.Error())
		fmt.Fprintf(os.Stderr, "bench: %s: %v\n", name, err)
		return targets, nil
	}
	return append(targets, &target{name: name, addr: addr, proc: c}), nil
}

// addFloors builds bench/floor and starts it once per model, as targets
// named go-goroutines and go-epoll.
func addFloors(ctx context.Context, cl *cleanup, dir, backendAddr string, cpus cpuLayout, targets []*target) ([]*target, error) {
	bin := filepath.Join(dir, "floor")
	fmt.Fprintln(os.Stderr, "bench: building bench/floor ...")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/portcullis/portcullis/bench/floor")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return targets, fmt.Errorf("go build bench/floor (run from inside the repository): %w", err)
	}
	for _, model := range []string{"goroutines", "epoll"} {
		ports, err := freePorts(2)
		if err != nil {
			return targets, err
		}
		addr := "127.0.0.1:" + strconv.Itoa(ports[0])
		metricsAddr := "127.0.0.1:" + strconv.Itoa(ports[1])
		argv, err := cpus.proxyArgv([]string{bin, "-model", model, "-listen", addr, "-backend", backendAddr, "-metrics", metricsAddr})
		if err != nil {
			return targets, err
		}
		name := "go-" + model
		c, err := startChild(name, filepath.Join(dir, name+".log"), argv...)
		if err != nil {
			return targets, err
		}
		cl.add(c.stop)
		if err := waitListening(ctx, c, addr, 15*time.Second); err != nil {
			return targets, fmt.Errorf("%s: %w", name, err)
		}
		targets = append(targets, &target{name: name, addr: addr, proc: c, metricsURL: "http://" + metricsAddr + "/metrics"})
	}
	return targets, nil
}

// startPortcullis writes the config and starts `portcullis serve`,
// returning once its listener accepts.
func startPortcullis(ctx context.Context, name, dir, bin, backendAddr string, procs int, godebug string, cpus cpuLayout) (c *child, addr, metricsAddr string, err error) {
	ports, err := freePorts(2)
	if err != nil {
		return nil, "", "", err
	}
	addr = "127.0.0.1:" + strconv.Itoa(ports[0])
	metricsAddr = "127.0.0.1:" + strconv.Itoa(ports[1])
	cfg := fmt.Sprintf(`# generated by portcullis/bench
shutdown_grace = "1s"

[metrics]
listen = %q

[state]
database = %s

[[listener]]
name = "bench"
listen = %q

  [[listener.route]]
  sni = %q
  backend = %q
`, metricsAddr, strconv.Quote(filepath.Join(dir, name+".db")), addr, serverName, backendAddr)
	path := filepath.Join(dir, name+".toml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return nil, "", "", err
	}
	argv := []string{bin, "serve", "-config", path, "-log-level", "error"}
	if env := portcullisEnv(procs, godebug); env != nil {
		// env(1) execs in place, so the PID measured is portcullis's.
		argv = append(append([]string{"env"}, env...), argv...)
	}
	if argv, err = cpus.proxyArgv(argv); err != nil {
		return nil, "", "", err
	}
	c, err = startChild(name, filepath.Join(dir, name+".log"), argv...)
	if err != nil {
		return nil, "", "", err
	}
	if err := waitListening(ctx, c, addr, 15*time.Second); err != nil {
		return c, "", "", err
	}
	return c, addr, metricsAddr, nil
}

// portcullisEnv is what -proxy-procs and -proxy-godebug add to
// portcullis's environment.
func portcullisEnv(procs int, godebug string) []string {
	var env []string
	if procs > 0 {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(procs))
	}
	if godebug != "" {
		env = append(env, "GODEBUG="+godebug)
	}
	return env
}

// startHAProxy writes a minimal SNI-routing haproxy.cfg and runs HAProxy
// in the foreground (-db), returning once its frontend accepts.
func startHAProxy(ctx context.Context, dir, path, backendAddr string, maxconn int, splice bool, cpus cpuLayout) (*child, string, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, "", err
	}
	addr := "127.0.0.1:" + strconv.Itoa(ports[0])
	spliceOption := ""
	if splice {
		spliceOption = "\n    option splice-auto"
	}
	cfg := fmt.Sprintf(`# generated by portcullis/bench
global
    maxconn %d

defaults
    mode tcp%s
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend f
    bind %s
    tcp-request inspect-delay 5s
    tcp-request content accept if { req_ssl_hello_type 1 }
    use_backend b if { req_ssl_sni -i %s }

backend b
    server s1 %s
`, maxconn, spliceOption, addr, serverName, backendAddr)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	c, err := startConfigured(ctx, "haproxy", dir, cfgPath, cfg, []string{path, "-f", cfgPath, "-db"}, addr, cpus)
	return c, addr, err
}

// startConfigured writes a reference proxy's config to cfgPath, starts
// argv on the proxies' CPUs with its output in dir/NAME.log, and
// returns once addr accepts. A child that started is returned even with
// an error, for the caller to stop.
func startConfigured(ctx context.Context, name, dir, cfgPath, cfg string, argv []string, addr string, cpus cpuLayout) (*child, error) {
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	argv, err := cpus.proxyArgv(argv)
	if err != nil {
		return nil, err
	}
	c, err := startChild(name, filepath.Join(dir, name+".log"), argv...)
	if err != nil {
		return nil, err
	}
	return c, waitListening(ctx, c, addr, 10*time.Second)
}

func haproxyVersion(ctx context.Context, path string) string {
	out, err := exec.CommandContext(ctx, path, "-v").Output()
	if err != nil {
		return "haproxy (version unknown)"
	}
	first, _, _ := strings.Cut(string(out), "\n")
	if f := strings.Fields(first); len(f) >= 3 {
		return "HAProxy " + f[2]
	}
	return strings.TrimSpace(first)
}
