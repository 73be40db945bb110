package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// dialTLS makes one client connection with a fresh configuration (no
// session cache, so always a full handshake) and sends the mode byte.
func dialTLS(ctx context.Context, p *pki, addr string, mode byte) (*tls.Conn, error) {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: p.clientConfig()}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	nc, err := d.DialContext(hctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := nc.(*tls.Conn)
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{mode}); err != nil {
		c.Close()
		return nil, err
	}
	c.SetWriteDeadline(time.Time{})
	return c, nil
}

// ping is one connection-rate iteration: handshake, 'P', read the one
// byte the backend answers, close. It also checks that routing works.
func ping(ctx context.Context, p *pki, addr string) error {
	c, err := dialTLS(ctx, p, addr, modePing)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	return nil
}

// bulkResult is one bulk-download measurement.
type bulkResult struct {
	Streams int       `json:"streams"`
	MiBps   float64   `json:"mib_per_s"`
	Bytes   int64     `json:"bytes_timed"` // read inside the timed window
	AllByte int64     `json:"bytes_all"`   // including the warm-up
	Seconds float64   `json:"seconds"`
	Rounds  []float64 `json:"rounds_mib_per_s,omitempty"`
}

// add folds one round into a total.
func (b *bulkResult) add(r bulkResult) {
	b.Bytes += r.Bytes
	b.AllByte += r.AllByte
	b.Seconds += r.Seconds
	b.MiBps = float64(b.Bytes) / (1 << 20) / b.Seconds
	b.Rounds = append(b.Rounds, r.MiBps)
}

// bulkWarmup is read and discarded before the timed window, so the
// socket buffers filled between 'B' and the first Read do not count.
const bulkWarmup = 200 * time.Millisecond

// runBulk opens streams connections in 'B' mode and reads from all of
// them for d; throughput is the sum over the streams.
func runBulk(ctx context.Context, p *pki, addr string, streams int, d time.Duration) (bulkResult, error) {
	res := bulkResult{Streams: streams}
	conns := make([]*tls.Conn, 0, streams)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range streams {
		c, err := dialTLS(ctx, p, addr, modeBulk)
		if err != nil {
			return res, err
		}
		conns = append(conns, c)
	}
	stopReads := context.AfterFunc(ctx, func() {
		for _, c := range conns {
			c.Close()
		}
	})
	defer stopReads()

	t0 := time.Now().Add(bulkWarmup)
	t1 := t0.Add(d)
	var timed, all atomic.Int64
	errs := make(chan error, streams)
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(t1)
			buf := make([]byte, 256<<10)
			var nt, na int64
			for {
				n, err := c.Read(buf)
				na += int64(n)
				if now := time.Now(); now.After(t0) && !now.After(t1) {
					nt += int64(n)
				}
				if err != nil {
					if !errors.Is(err, os.ErrDeadlineExceeded) {
						errs <- err
					}
					break
				}
			}
			timed.Add(nt)
			all.Add(na)
		}()
	}
	wg.Wait()
	close(errs)
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if err := <-errs; err != nil {
		return res, fmt.Errorf("bulk read: %w", err)
	}
	res.Bytes, res.AllByte = timed.Load(), all.Load()
	res.Seconds = d.Seconds()
	res.MiBps = float64(res.Bytes) / (1 << 20) / res.Seconds
	return res, nil
}

// rateResult is one connection-rate measurement.
type rateResult struct {
	Workers  int       `json:"workers"`
	Conns    int64     `json:"connections"`
	Errors   int64     `json:"errors"`
	FirstErr string    `json:"first_error,omitempty"`
	Seconds  float64   `json:"seconds"`
	PerSec   float64   `json:"connections_per_s"`
	Rounds   []float64 `json:"rounds_connections_per_s,omitempty"`
}

// add folds one round into a total.
func (a *rateResult) add(r rateResult) {
	a.Conns += r.Conns
	a.Errors += r.Errors
	if a.FirstErr == "" {
		a.FirstErr = r.FirstErr
	}
	a.Seconds += r.Seconds
	a.PerSec = float64(a.Conns) / a.Seconds
	a.Rounds = append(a.Rounds, r.PerSec)
}

// runRate has workers loop over ping for d and counts completed
// connections.
func runRate(ctx context.Context, p *pki, addr string, workers int, d time.Duration) (rateResult, error) {
	res := rateResult{Workers: workers}
	var ok, failed atomic.Int64
	var firstErr atomic.Pointer[error]
	start := time.Now()
	end := start.Add(d)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) && ctx.Err() == nil {
				if err := ping(ctx, p, addr); err != nil {
					if ctx.Err() != nil {
						return
					}
					failed.Add(1)
					firstErr.CompareAndSwap(nil, &err)
					continue
				}
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.Seconds = time.Since(start).Seconds()
	res.Conns, res.Errors = ok.Load(), failed.Load()
	if e := firstErr.Load(); e != nil {
		res.FirstErr = (*e).Error()
	}
	if res.Conns == 0 {
		return res, fmt.Errorf("no connection completed: %s", res.FirstErr)
	}
	res.PerSec = float64(res.Conns) / res.Seconds
	return res, nil
}

// idleResult is what holding idle connections costs one proxy process.
type idleResult struct {
	Requested    int     `json:"requested"`
	Held         int     `json:"held"`
	Capped       string  `json:"capped,omitempty"` // why Held < Requested
	ProxyNofile  uint64  `json:"proxy_nofile_limit"`
	RSSBeforeKiB int64   `json:"rss_before_kib"`
	RSSAfterKiB  int64   `json:"rss_after_kib"`
	KiBPerConn   float64 `json:"kib_per_conn"`
	FDsBefore    int     `json:"fds_before"`
	FDsAfter     int     `json:"fds_after"`
	PipesBefore  int     `json:"pipe_fds_before"`
	PipesAfter   int     `json:"pipe_fds_after"`
	FDsPerConn   float64 `json:"fds_per_conn"`
	PipesPerConn float64 `json:"pipe_fds_per_conn"`

	// Only for portcullis: the Go runtime's view, from its /metrics.
	GoBefore *goStats `json:"go_before,omitempty"`
	GoAfter  *goStats `json:"go_after,omitempty"`
}

// goStats are the Go runtime gauges, scraped from portcullis's /metrics,
// that say where its idle RSS goes.
type goStats struct {
	Goroutines      float64 `json:"goroutines"`
	StackInuseBytes float64 `json:"stack_inuse_bytes"`
	HeapInuseBytes  float64 `json:"heap_inuse_bytes"`
}

// perConn is the growth from GoBefore to GoAfter per held connection.
func (r *idleResult) perConn() (goroutines, stackKiB, heapKiB float64, ok bool) {
	if r.GoBefore == nil || r.GoAfter == nil || r.Held == 0 {
		return 0, 0, 0, false
	}
	n := float64(r.Held)
	return (r.GoAfter.Goroutines - r.GoBefore.Goroutines) / n,
		(r.GoAfter.StackInuseBytes - r.GoBefore.StackInuseBytes) / 1024 / n,
		(r.GoAfter.HeapInuseBytes - r.GoBefore.HeapInuseBytes) / 1024 / n,
		true
}

// scrapeGoStats reads the Go runtime gauges from a Prometheus text
// endpoint.
func scrapeGoStats(url string) (*goStats, error) {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var g goStats
	want := map[string]*float64{
		"go_goroutines":                 &g.Goroutines,
		"go_memstats_stack_inuse_bytes": &g.StackInuseBytes,
		"go_memstats_heap_inuse_bytes":  &g.HeapInuseBytes,
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		if dst, ok := want[f[0]]; ok {
			if *dst, err = strconv.ParseFloat(f[1], 64); err != nil {
				return nil, fmt.Errorf("%s: %w", f[0], err)
			}
			delete(want, f[0])
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(want) > 0 {
		return nil, fmt.Errorf("GET %s: missing %d Go runtime gauges", url, len(want))
	}
	return &g, nil
}

// idleProbe connections are opened first to learn how many descriptors
// one idle connection costs the proxy, before committing to the rest.
const (
	idleProbe     = 200
	idleMin       = 100 // fewer than this is no measurement: skip
	idleDialers   = 16
	fdHeadroom    = 256 // descriptors left free in every process
	settleTime    = time.Second
	idleWaitLimit = 30 * time.Second
)

// errSkipped marks a phase that could not be run on this machine.
var errSkipped = errors.New("skipped")

// runIdle parks up to n idle connections on the proxy process pid and
// measures its RSS and descriptors (with its workers', if it has any)
// before and after. benchNofile is this process's own soft limit: every
// idle connection costs the benchmark two descriptors (client end and
// backend end).
// metricsURL, if not empty, is the proxy's Prometheus endpoint for the
// Go runtime breakdown.
func runIdle(ctx context.Context, p *pki, b *backend, addr string, pid, n int, benchNofile uint64, metricsURL string) (idleResult, error) {
	res := idleResult{Requested: n}
	if err := waitIdleCount(ctx, b, 0); err != nil {
		return res, fmt.Errorf("connections of an earlier phase still open: %w", err)
	}
	limit, err := treeNofileSoft(pid)
	if err != nil {
		return res, err
	}
	res.ProxyNofile = limit
	selfFDs, _, err := fdCount(os.Getpid())
	if err != nil {
		return res, err
	}
	if benchCap := (int(benchNofile) - selfFDs - fdHeadroom) / 2; benchCap < n {
		if benchCap < idleMin {
			return res, fmt.Errorf("%w: the benchmark's RLIMIT_NOFILE (%d) leaves room for only %d idle connections (two descriptors each); raise `ulimit -Hn`", errSkipped, benchNofile, max(benchCap, 0))
		}
		n = benchCap
		res.Capped = fmt.Sprintf("the benchmark's RLIMIT_NOFILE %d (2 fds per connection)", benchNofile)
	}

	// Scrape first: the first /metrics request grows portcullis's heap
	// and RSS by about 1 MiB of its own, which must not land between the
	// two RSS readings and be charged to the idle connections. The
	// scrape's keep-alive connection is then in the fd baseline too.
	if metricsURL != "" {
		if res.GoBefore, err = scrapeGoStats(metricsURL); err != nil {
			return res, err
		}
	}
	if res.RSSBeforeKiB, err = treeRSSKiB(pid); err != nil {
		return res, err
	}
	if res.FDsBefore, res.PipesBefore, err = treeFDCount(pid); err != nil {
		return res, err
	}

	var conns []*tls.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
		// Let the proxy tear them down before the next phase.
		waitIdleCount(ctx, b, 0)
	}()

	probe := min(n, idleProbe)
	if conns, err = openIdle(ctx, p, b, addr, conns, probe); err != nil {
		return res, err
	}
	fds, _, err := treeFDCount(pid)
	if err != nil {
		return res, err
	}
	if per := float64(fds-res.FDsBefore) / float64(probe); per > 0 {
		room := int(float64(int(limit)-res.FDsBefore-fdHeadroom) / math.Ceil(per))
		if room < n {
			if room < idleMin {
				return res, fmt.Errorf("%w: the proxy's RLIMIT_NOFILE (%d) leaves room for only %d idle connections at %.1f fds each", errSkipped, limit, max(room, 0), per)
			}
			n = room
			res.Capped = fmt.Sprintf("the proxy's RLIMIT_NOFILE %d at %.0f fds per connection", limit, math.Ceil(per))
		}
	}
	if conns, err = openIdle(ctx, p, b, addr, conns, n-len(conns)); err != nil {
		return res, err
	}
	res.Held = len(conns)

	select {
	case <-ctx.Done():
		return res, ctx.Err()
	case <-time.After(settleTime):
	}
	if res.RSSAfterKiB, err = treeRSSKiB(pid); err != nil {
		return res, err
	}
	if res.FDsAfter, res.PipesAfter, err = treeFDCount(pid); err != nil {
		return res, err
	}
	if metricsURL != "" {
		if res.GoAfter, err = scrapeGoStats(metricsURL); err != nil {
			return res, err
		}
	}
	held := float64(res.Held)
	res.KiBPerConn = float64(res.RSSAfterKiB-res.RSSBeforeKiB) / held
	res.FDsPerConn = float64(res.FDsAfter-res.FDsBefore) / held
	res.PipesPerConn = float64(res.PipesAfter-res.PipesBefore) / held
	return res, nil
}

// openIdle opens k more idle connections with a few concurrent dialers,
// appends them to conns, and waits until the backend has all of them
// parked, so the proxy's relay for each one is fully set up.
func openIdle(ctx context.Context, p *pki, b *backend, addr string, conns []*tls.Conn, k int) ([]*tls.Conn, error) {
	want := len(conns) + k
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		firstErr error
		next     atomic.Int64
		wg       sync.WaitGroup
	)
	for range min(idleDialers, k) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(k) && ctx.Err() == nil {
				c, err := dialTLS(ctx, p, addr, modeIdle)
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
					cancel()
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return conns, fmt.Errorf("opening idle connection %d of %d: %w", len(conns)+1, want, firstErr)
	}
	if err := ctx.Err(); err != nil {
		return conns, err
	}
	if err := waitIdleCount(ctx, b, want); err != nil {
		return conns, err
	}
	return conns, nil
}

// waitIdleCount waits until exactly want connections are parked at the
// backend.
func waitIdleCount(ctx context.Context, b *backend, want int) error {
	deadline := time.Now().Add(idleWaitLimit)
	for {
		got := b.idle.Load()
		if got == int64(want) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("backend holds %d idle connections, want %d", got, want)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
