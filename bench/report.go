package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"
)

type report struct {
	Started        time.Time       `json:"started"`
	Seconds        float64         `json:"seconds"`
	GoVersion      string          `json:"go_version"`
	Platform       string          `json:"platform"`
	CPUs           int             `json:"cpus"`
	CPULayout      string          `json:"cpu_layout"`
	PortcullisEnv  string          `json:"portcullis_env,omitempty"`
	Portcullis     string          `json:"portcullis_version"`
	HAProxy        string          `json:"haproxy"`
	HAProxyMaxconn int             `json:"haproxy_maxconn,omitempty"`
	Nginx          string          `json:"nginx"`
	Duration       string          `json:"duration_per_phase"`
	Streams        int             `json:"bulk_streams"`
	Workers        int             `json:"rate_workers"`
	Rounds         int             `json:"rounds"`
	IdleRequested  int             `json:"idle_requested"`
	Nofile         uint64          `json:"bench_nofile_limit"`
	LoadAvgStart   string          `json:"loadavg_start"`
	LoadAvgEnd     string          `json:"loadavg_end,omitempty"`
	Targets        []*targetResult `json:"targets"`
	Notes          []string        `json:"notes,omitempty"`
}

type targetResult struct {
	Name     string      `json:"name"`
	Addr     string      `json:"addr"`
	PID      int         `json:"pid,omitempty"`
	Bulk1    *bulkResult `json:"bulk_1_stream,omitempty"`
	BulkN    *bulkResult `json:"bulk_n_streams,omitempty"`
	Rate     *rateResult `json:"connection_rate,omitempty"`
	Idle     *idleResult `json:"idle,omitempty"`
	ProxyCPU *cpuUse     `json:"proxy_cpu,omitempty"` // the proxy process
	LoadCPU  *cpuUse     `json:"load_cpu"`            // this process: clients and backend
	Errors   []string    `json:"errors,omitempty"`
}

// cpuUse is CPU time (user+system) spent in the bulk phases and in the
// connection-rate phase, and what it comes to per unit of work.
type cpuUse struct {
	BulkSeconds   float64 `json:"bulk_cpu_s"`
	BulkBytes     int64   `json:"bulk_bytes"`
	SecondsPerGiB float64 `json:"cpu_s_per_gib"`
	RateSeconds   float64 `json:"rate_cpu_s"`
	RateConns     int64   `json:"rate_connections"`
	MicrosPerConn float64 `json:"cpu_us_per_connection"`
	RateSleeps    int64   `json:"rate_sleeps"` // voluntary context switches, see sleeps
	SleepsPerConn float64 `json:"sleeps_per_connection"`
}

func (r *targetResult) bulk(streams int) *bulkResult {
	if streams == 1 {
		return r.Bulk1
	}
	return r.BulkN
}

// perGiB and perConn are the unit costs, false while nothing was
// measured (or for the proxy columns of direct, whose cpuUse is nil).
func (u *cpuUse) perGiB() (float64, bool) {
	if u == nil || u.BulkBytes == 0 {
		return 0, false
	}
	return u.SecondsPerGiB, true
}

func (u *cpuUse) perConn() (float64, bool) {
	if u == nil || u.RateConns == 0 {
		return 0, false
	}
	return u.MicrosPerConn, true
}

func (u *cpuUse) sleepsPerConn() (float64, bool) {
	if u == nil || u.RateConns == 0 {
		return 0, false
	}
	return u.SleepsPerConn, true
}

func (r *targetResult) addBulkCPU(proxy, load usage, bytes int64) {
	for _, u := range []struct {
		c *cpuUse
		s usage
	}{{r.ProxyCPU, proxy}, {r.LoadCPU, load}} {
		if u.c == nil {
			continue
		}
		u.c.BulkSeconds += u.s.cpu
		u.c.BulkBytes += bytes
		u.c.SecondsPerGiB = u.c.BulkSeconds / (float64(u.c.BulkBytes) / (1 << 30))
	}
}

func (r *targetResult) addRateCPU(proxy, load usage, conns int64) {
	for _, u := range []struct {
		c *cpuUse
		s usage
	}{{r.ProxyCPU, proxy}, {r.LoadCPU, load}} {
		if u.c == nil {
			continue
		}
		u.c.RateSeconds += u.s.cpu
		u.c.RateSleeps += u.s.sleeps
		u.c.RateConns += conns
		u.c.MicrosPerConn = u.c.RateSeconds / float64(u.c.RateConns) * 1e6
		u.c.SleepsPerConn = float64(u.c.RateSleeps) / float64(u.c.RateConns)
	}
}

func printHeader(w io.Writer, rep *report) {
	if rep.CPULayout == "shared" {
		fmt.Fprintf(w, "portcullis load benchmark: loopback only, %d CPUs shared by the load\n", rep.CPUs)
		fmt.Fprintf(w, "generator, the TLS backend (both in this process) and the proxy under\n")
		fmt.Fprintf(w, "test. ")
	} else {
		fmt.Fprintf(w, "portcullis load benchmark: loopback only, %d CPUs, %s.\n", rep.CPUs, rep.CPULayout)
	}
	fmt.Fprintf(w, "Phases run one at a time: %s per phase and target, in %d\n", rep.Duration, rep.Rounds)
	fmt.Fprintf(w, "rounds that alternate the targets.\n")
	fmt.Fprintf(w, "%s %s; %s; %s; %s\n", rep.GoVersion, rep.Platform, orUnknown(rep.Portcullis), rep.HAProxy, rep.Nginx)
	if rep.PortcullisEnv != "" {
		fmt.Fprintf(w, "portcullis runs with %s\n", rep.PortcullisEnv)
	}
	fmt.Fprintf(w, "load average before the run: %s (anything else running skews the numbers)\n", rep.LoadAvgStart)
}

// loadAvg is the 1, 5 and 15 minute load averages from /proc/loadavg.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func orUnknown(s string) string {
	if s == "" {
		return "portcullis (version unknown)"
	}
	return s
}

// printTable writes the human-readable result: the per-target metrics
// with their ratio to direct, then the per-proxy-process costs.
func printTable(out io.Writer, rep *report) {
	fmt.Fprintln(out)
	printHeader(out, rep)
	fmt.Fprintln(out)

	direct := rep.Targets[0]
	proxies := rep.Targets[1:]
	var tab table

	// A metric is one table row; get reports false when a target has no
	// value. ratio adds value/direct; rounds, when set, adds the range of
	// per-round ratios.
	type metric struct {
		label  string
		format string
		get    func(*targetResult) (float64, bool)
		ratio  bool
		rounds func(*targetResult) []float64
	}
	bulk1 := func(t *targetResult) (float64, bool) {
		if t.Bulk1 == nil {
			return 0, false
		}
		return t.Bulk1.MiBps, true
	}
	bulkN := func(t *targetResult) (float64, bool) {
		if t.BulkN == nil {
			return 0, false
		}
		return t.BulkN.MiBps, true
	}
	rate := func(t *targetResult) (float64, bool) {
		if t.Rate == nil {
			return 0, false
		}
		return t.Rate.PerSec, true
	}
	loadGiB := func(t *targetResult) (float64, bool) { return t.LoadCPU.perGiB() }
	loadConn := func(t *targetResult) (float64, bool) { return t.LoadCPU.perConn() }
	proxyGiB := func(t *targetResult) (float64, bool) { return t.ProxyCPU.perGiB() }
	proxyConn := func(t *targetResult) (float64, bool) { return t.ProxyCPU.perConn() }
	loadSleeps := func(t *targetResult) (float64, bool) { return t.LoadCPU.sleepsPerConn() }
	proxySleeps := func(t *targetResult) (float64, bool) { return t.ProxyCPU.sleepsPerConn() }
	// sum adds the proxy's share (none for direct) to the load's.
	sum := func(load, proxy func(*targetResult) (float64, bool)) func(*targetResult) (float64, bool) {
		return func(t *targetResult) (float64, bool) {
			l, ok := load(t)
			if !ok {
				return 0, false
			}
			if t.ProxyCPU == nil {
				return l, true
			}
			p, ok := proxy(t)
			return l + p, ok
		}
	}
	idle := func(f func(*idleResult) float64) func(*targetResult) (float64, bool) {
		return func(t *targetResult) (float64, bool) {
			if t.Idle == nil {
				return 0, false
			}
			return f(t.Idle), true
		}
	}
	idleGo := func(i int) func(*targetResult) (float64, bool) {
		return func(t *targetResult) (float64, bool) {
			if t.Idle == nil {
				return 0, false
			}
			g, st, h, ok := t.Idle.perConn()
			return [3]float64{g, st, h}[i], ok
		}
	}

	perTarget := []metric{
		{label: "bulk, 1 stream (MiB/s)", format: "%.0f", get: bulk1, ratio: true,
			rounds: func(t *targetResult) []float64 { return t.Bulk1.Rounds }},
		{label: fmt.Sprintf("bulk, %d streams (MiB/s)", rep.Streams), format: "%.0f", get: bulkN, ratio: true,
			rounds: func(t *targetResult) []float64 { return t.BulkN.Rounds }},
		{label: fmt.Sprintf("new TLS conns/s, %d workers", rep.Workers), format: "%.0f", get: rate, ratio: true,
			rounds: func(t *targetResult) []float64 { return t.Rate.Rounds }},
		{label: "client+backend CPU s/GiB", format: "%.3f", get: loadGiB},
		{label: "  + proxy = all CPU s/GiB", format: "%.3f", get: sum(loadGiB, proxyGiB), ratio: true},
		{label: "client+backend CPU µs/conn", format: "%.0f", get: loadConn},
		{label: "  + proxy = all CPU µs/conn", format: "%.0f", get: sum(loadConn, proxyConn), ratio: true},
		{label: "client+backend sleeps/conn", format: "%.1f", get: loadSleeps},
	}
	perProxy := []metric{
		{label: "CPU s per GiB relayed", format: "%.3f", get: proxyGiB},
		{label: "CPU µs per new connection", format: "%.0f", get: proxyConn},
		{label: "sleeps per new connection", format: "%.1f", get: proxySleeps},
		{label: "idle connections held", format: "%.0f", get: idle(func(i *idleResult) float64 { return float64(i.Held) })},
		{label: "idle RSS before (MiB)", format: "%.1f", get: idle(func(i *idleResult) float64 { return float64(i.RSSBeforeKiB) / 1024 })},
		{label: "idle RSS after (MiB)", format: "%.1f", get: idle(func(i *idleResult) float64 { return float64(i.RSSAfterKiB) / 1024 })},
		{label: "RSS per idle conn (KiB)", format: "%.1f", get: idle(func(i *idleResult) float64 { return i.KiBPerConn })},
		{label: "fds per idle conn", format: "%.2f", get: idle(func(i *idleResult) float64 { return i.FDsPerConn })},
		{label: "  of which pipe ends", format: "%.2f", get: idle(func(i *idleResult) float64 { return i.PipesPerConn })},
		{label: "goroutines per idle conn", format: "%.2f", get: idleGo(0)},
		{label: "Go stacks per idle conn (KiB)", format: "%.1f", get: idleGo(1)},
		{label: "Go heap per idle conn (KiB)", format: "%.1f", get: idleGo(2)},
	}

	head := []string{"", "direct"}
	for _, t := range proxies {
		head = append(head, t.Name, "÷direct", "rounds")
	}
	tab.add(head...)
	for _, m := range perTarget {
		d, dok := m.get(direct)
		cells := []string{m.label, cell(m.format, d, dok)}
		for _, t := range proxies {
			v, ok := m.get(t)
			r, spread := "", ""
			if m.ratio && ok && dok && d > 0 {
				r = fmt.Sprintf("%.2f", v/d)
				if m.rounds != nil {
					spread = ratioRange(m.rounds(t), m.rounds(direct))
				}
			}
			cells = append(cells, cell(m.format, v, ok), r, spread)
		}
		tab.add(cells...)
	}

	tab.add()
	head = []string{"proxy process", ""}
	for _, t := range proxies {
		head = append(head, t.Name, "", "")
	}
	tab.add(head...)
	for _, m := range perProxy {
		cells := []string{m.label, ""}
		for _, t := range proxies {
			v, ok := m.get(t)
			cells = append(cells, cell(m.format, v, ok), "", "")
		}
		tab.add(cells...)
	}
	tab.write(out)

	fmt.Fprintln(out)
	fmt.Fprintln(out, "÷direct = proxied value / direct value. Throughput and conns/s: 1.00 means")
	fmt.Fprintln(out, "the client sees no cost, 0.80 means 80% of direct. All CPU per unit: 1.50")
	fmt.Fprintln(out, "means the machine spends 50% more CPU per GiB or connection; on a saturated")
	fmt.Fprintln(out, "machine throughput ÷direct tends to 1 / that, and it is far less sensitive to")
	fmt.Fprintln(out, "other load on the machine than throughput is.")
	fmt.Fprintf(out, "rounds = lowest–highest ratio among the %d rounds, each against the direct\n", rep.Rounds)
	fmt.Fprintln(out, "run of the same round: a wide range means a noisy machine.")
	fmt.Fprintln(out, "sleeps = voluntary context switches: each is a wakeup paid later. A process")
	fmt.Fprintln(out, "waiting on a slower peer runs out of work and sleeps more for the same work.")
	for _, t := range proxies {
		if t.Idle != nil && t.Idle.Capped != "" {
			fmt.Fprintf(out, "note: %s held %d of %d idle connections, capped by %s.\n", t.Name, t.Idle.Held, t.Idle.Requested, t.Idle.Capped)
		}
	}
	for _, n := range rep.Notes {
		fmt.Fprintln(out, "note:", n)
	}
	for _, t := range rep.Targets {
		for _, e := range t.Errors {
			fmt.Fprintf(out, "%s: %s\n", t.Name, e)
		}
	}
	if rep.Seconds > 0 {
		fmt.Fprintf(out, "total run time %.0fs; load average after: %s\n", rep.Seconds, rep.LoadAvgEnd)
	}
}

// table lays out rows with the first column left-aligned and the others
// right-aligned, which text/tabwriter cannot mix.
type table struct{ rows [][]string }

func (t *table) add(cells ...string) { t.rows = append(t.rows, cells) }

func (t *table) write(w io.Writer) {
	var width []int
	for _, r := range t.rows {
		for i, c := range r {
			if i == len(width) {
				width = append(width, 0)
			}
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	for _, r := range t.rows {
		var b strings.Builder
		for i, c := range r {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			if i == 0 {
				b.WriteString(c + pad)
			} else {
				b.WriteString("  " + pad + c)
			}
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
}

// ratioRange is the lowest and highest per-round ratio of v to d.
func ratioRange(v, d []float64) string {
	if len(v) < 2 || len(v) != len(d) {
		return ""
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for i := range v {
		if d[i] <= 0 {
			return ""
		}
		r := v[i] / d[i]
		lo, hi = min(lo, r), max(hi, r)
	}
	return fmt.Sprintf("%.2f–%.2f", lo, hi)
}

func cell(format string, v float64, ok bool) string {
	if !ok {
		return "-"
	}
	return fmt.Sprintf(format, v)
}

func writeJSON(path string, rep *report) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
