package firewall

import (
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// allowN calls Allow n times at now and returns how many were allowed.
func allowN(l *Limiter, a netip.Addr, now time.Time, n int) int {
	ok := 0
	for range n {
		if l.Allow(a, now) {
			ok++
		}
	}
	return ok
}

func TestLimiterWindow(t *testing.T) {
	const limit = 5
	const window = 10 * time.Second
	for _, name := range []string{"ipv4", "ipv6"} {
		t.Run(name, func(t *testing.T) {
			l := NewLimiter(limit, window, 0)
			a := netip.MustParseAddr("192.0.2.1")
			if name == "ipv6" {
				a = netip.MustParseAddr("2001:db8::1")
			}
			sub := time.Duration(l.sub)
			t0 := time.Now()

			if got := allowN(l, a, t0, limit); got != limit {
				t.Fatalf("first %d: %d allowed", limit, got)
			}
			if l.Allow(a, t0) {
				t.Fatal("connection limit+1 allowed")
			}
			// Still inside the window: an exact sliding log would refuse
			// too, so this holds for any correct limiter.
			if l.Allow(a, t0.Add(window-time.Nanosecond)) {
				t.Fatal("allowed before the window slid past the first burst")
			}
			// A window plus one sub-window later the burst has left the
			// span, and the whole budget is back.
			t1 := t0.Add(window + sub)
			if got := allowN(l, a, t1, limit+1); got != limit {
				t.Fatalf("after the window slid: %d allowed, want %d", got, limit)
			}
		})
	}
}

func TestLimiterNoBoundaryBurst(t *testing.T) {
	const limit = 10
	const window = 7 * time.Second // a whole number of sub-windows
	l := NewLimiter(limit, window, 0)
	// Boundaries of the limiter's own sub-windows, the place where a
	// fixed-bucket limiter would reset.
	boundary := l.origin.Add(100 * window)
	tests := []struct {
		name          string
		first, second time.Time
	}{
		{"ns either side of a window boundary", boundary.Add(-time.Nanosecond), boundary},
		{"ms either side", boundary.Add(-time.Millisecond), boundary.Add(time.Millisecond)},
		{"end and start of a sub-window", boundary.Add(time.Second - 1), boundary.Add(time.Second)},
		{"nearly a window apart", boundary.Add(-window / 2), boundary.Add(window/2 - time.Millisecond)},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := netip.AddrFrom4([4]byte{198, 51, 100, byte(i)})
			if got := allowN(l, a, tt.first, limit); got != limit {
				t.Fatalf("first burst: %d allowed, want %d", got, limit)
			}
			if got := allowN(l, a, tt.second, limit); got != 0 {
				t.Fatalf("second burst %v later: %d allowed, want 0", tt.second.Sub(tt.first), got)
			}
		})
	}
}

// TestLimiterMatchesSlidingLog drives the limiter with random traffic
// and checks it against an exact sliding log: it must never allow more
// than limit in any window (safety), and must allow whenever fewer than
// limit were allowed in the last window plus one sub-window (liveness).
func TestLimiterMatchesSlidingLog(t *testing.T) {
	const limit = 20
	const window = 700 * time.Millisecond
	rng := rand.New(rand.NewPCG(7, 7))
	for _, meanGap := range []time.Duration{time.Millisecond, 10 * time.Millisecond, 35 * time.Millisecond, 100 * time.Millisecond} {
		t.Run(meanGap.String(), func(t *testing.T) {
			l := NewLimiter(limit, window, 0)
			span := 8 * time.Duration(l.sub) // what the ring covers at most
			a := netip.MustParseAddr("203.0.113.9")
			var allowed []time.Time
			now := time.Now()
			for range 20000 {
				now = now.Add(time.Duration(rng.ExpFloat64() * float64(meanGap)))
				inWindow, inSpan := 0, 0
				for _, at := range allowed {
					if now.Sub(at) < window {
						inWindow++
					}
					if now.Sub(at) < span {
						inSpan++
					}
				}
				ok := l.Allow(a, now)
				if ok && inWindow >= limit {
					t.Fatalf("at %v: allowed with %d already in the last window", now, inWindow)
				}
				if !ok && inSpan < limit {
					t.Fatalf("at %v: refused with only %d in the last %v", now, inSpan, span)
				}
				if ok {
					allowed = append(allowed, now)
				}
				// Keep the log short: only the ring's span matters.
				for len(allowed) > 0 && now.Sub(allowed[0]) >= span {
					allowed = allowed[1:]
				}
			}
		})
	}
}

func TestLimiterKeys(t *testing.T) {
	const limit = 3
	tests := []struct {
		name   string
		a, b   string
		shared bool
	}{
		{"IPv6 same /64", "2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", true},
		{"IPv6 adjacent /64s", "2001:db8:1:2::1", "2001:db8:1:3::1", false},
		{"IPv6 different /48", "2001:db8:1:2::1", "2001:db8:2:2::1", false},
		{"IPv4 mapped and plain", "::ffff:192.0.2.1", "192.0.2.1", true},
		{"IPv4 neighbours", "192.0.2.1", "192.0.2.2", false},
		{"IPv4 and IPv4-compatible IPv6", "192.0.2.1", "::192.0.2.1", false},
		{"IPv4 and its tag's /64", "192.0.2.1", "ff00::c000:201", false},
		{"IPv4 and ::/64", "0.0.0.1", "::1", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := NewLimiter(limit, time.Minute, 0)
			now := time.Now()
			a, b := netip.MustParseAddr(tt.a), netip.MustParseAddr(tt.b)
			if got := allowN(l, a, now, limit); got != limit {
				t.Fatalf("%s: %d allowed", a, got)
			}
			got := allowN(l, b, now, limit)
			if tt.shared && got != 0 {
				t.Errorf("%s allowed %d after %s spent the shared budget", b, got, a)
			}
			if !tt.shared && got != limit {
				t.Errorf("%s allowed %d, want its own budget of %d", b, got, limit)
			}
		})
	}
}

func TestLimiterNil(t *testing.T) {
	a := netip.MustParseAddr("192.0.2.1")
	for _, tt := range []struct {
		name   string
		limit  int
		window time.Duration
	}{
		{"zero limit", 0, time.Second},
		{"negative limit", -1, time.Second},
		{"zero window", 10, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			l := NewLimiter(tt.limit, tt.window, 0)
			if l != nil {
				t.Fatal("NewLimiter returned a limiter")
			}
			if got := allowN(l, a, time.Now(), 1000); got != 1000 {
				t.Errorf("nil Limiter allowed %d of 1000", got)
			}
			if l.Len() != 0 {
				t.Errorf("nil Limiter Len = %d", l.Len())
			}
		})
	}
}

func TestLimiterClockOrder(t *testing.T) {
	l := NewLimiter(2, time.Second, 0)
	a := netip.MustParseAddr("192.0.2.1")
	t0 := time.Now()
	sub := time.Duration(l.sub)
	// Callers racing across a sub-window boundary: the late one still
	// counts, in the newest sub-window.
	if !l.Allow(a, t0.Add(sub)) || !l.Allow(a, t0) {
		t.Fatal("first two refused")
	}
	if l.Allow(a, t0.Add(sub)) {
		t.Fatal("third allowed: the out-of-order call was not counted")
	}
	// A clock far in the past restarts the source rather than pinning
	// it until the clock catches up.
	if !l.Allow(a, t0.Add(-time.Hour)) {
		t.Fatal("refused after the clock stepped back an hour")
	}
}

func TestLimiterLimitCap(t *testing.T) {
	l := NewLimiter(1<<20, time.Second, 0)
	a := netip.MustParseAddr("192.0.2.1")
	now := time.Now()
	if got := allowN(l, a, now, maxLimit+10); got != maxLimit {
		t.Errorf("allowed %d, want the cap %d", got, maxLimit)
	}
}

func TestLimiterExpiry(t *testing.T) {
	const window = time.Second
	// One shard with room for 16 sources, so that a sweep (which sees up
	// to 8 sources) covers the whole table and the outcome is certain.
	l := NewLimiter(1, window, 1)
	l.perShard, l.maxSlots = 16, maxSlots(16)
	addr := func(gen, i int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(gen), 0, byte(i)}) }
	t0 := time.Now()
	for i := range 6 {
		l.Allow(addr(0, i), t0)
	}
	// A window later the sources still count, and are kept.
	t1 := t0.Add(window)
	l.Allow(addr(1, 0), t1)
	if got := l.Len(); got != 7 {
		t.Fatalf("Len = %d within the window, want 7", got)
	}
	// A window and a sub-window after t0 the first generation has
	// nothing left to count: the next new source sweeps it out.
	t2 := t0.Add(window + time.Duration(l.sub))
	l.Allow(addr(2, 0), t2)
	if got := l.Len(); got != 2 {
		t.Errorf("Len = %d after expiry, want 2", got)
	}
	// The survivor still has its connection counted.
	if l.Allow(addr(1, 0), t2) {
		t.Error("budget of a live source lost in the sweep")
	}
}

func TestLimiterEviction(t *testing.T) {
	t.Run("evicted source restarts", func(t *testing.T) {
		l := NewLimiter(1, time.Minute, 1) // one shard, one source
		t0 := time.Now()
		a := netip.MustParseAddr("192.0.2.1")
		b := netip.MustParseAddr("2001:db8::1")
		if !l.Allow(a, t0) || l.Allow(a, t0) {
			t.Fatal("limit 1 not applied to a")
		}
		if !l.Allow(b, t0) {
			t.Fatal("b refused")
		}
		if got := l.Len(); got != 1 {
			t.Fatalf("Len = %d, want 1", got)
		}
		// b took a's place at the cap, so a is new again: documented.
		if !l.Allow(a, t0) {
			t.Error("evicted a did not restart from zero")
		}
	})
	// The sweep unit: a one-shard limiter small enough that a sweep
	// sees every source, filled with chosen states.
	fill := func(t *testing.T, perShard int, states map[uint64]int64) (*Limiter, *limiterShard) {
		t.Helper()
		l := NewLimiter(1, time.Minute, 1)
		l.perShard, l.maxSlots = perShard, maxSlots(perShard)
		s := &l.shards[0]
		for k, last := range states {
			l.grow(s)
			i, _ := s.find(k, l.hash(k))
			s.slots[i] = slot{key: k, sourceState: sourceState{last: last}}
			s.n++
		}
		return l, s
	}
	keys := func(l *Limiter, s *limiterShard) map[uint64]bool {
		m := map[uint64]bool{}
		for _, sl := range s.slots {
			if sl.key != 0 {
				if i, ok := s.find(sl.key, l.hash(sl.key)); !ok || s.slots[i].key != sl.key {
					t.Errorf("key %d not found by its probe", sl.key)
				}
				m[sl.key] = true
			}
		}
		if len(m) != s.n {
			t.Errorf("n = %d, %d keys present", s.n, len(m))
		}
		return m
	}
	t.Run("least recently seen of the sample goes", func(t *testing.T) {
		l, s := fill(t, 3, map[uint64]int64{1: 10, 2: 4, 3: 12})
		l.sweep(s, 12)
		if got := keys(l, s); len(got) != 2 || got[2] {
			t.Errorf("after sweep: %v, want key 2 evicted", got)
		}
	})
	t.Run("between equally recent, the fewest counted goes", func(t *testing.T) {
		l, s := fill(t, 3, map[uint64]int64{1: 10, 2: 10, 3: 10})
		for _, k := range []uint64{1, 3} {
			i, _ := s.find(k, l.hash(k))
			s.slots[i].counts[10%ringSize] = 5
		}
		l.sweep(s, 10)
		if got := keys(l, s); len(got) != 2 || got[2] {
			t.Errorf("after sweep: %v, want key 2 evicted", got)
		}
	})
	t.Run("expired sources go before any eviction", func(t *testing.T) {
		l, s := fill(t, 4, map[uint64]int64{1: 10, 2: 2, 3: 12, 4: 1})
		l.sweep(s, 16) // 16-2 and 16-1 >= ringSize: expired
		if got := keys(l, s); len(got) != 2 || !got[1] || !got[3] {
			t.Errorf("after sweep: %v, want only the expired 2 and 4 gone", got)
		}
	})
	t.Run("not full: only expired sources go", func(t *testing.T) {
		l, s := fill(t, 8, map[uint64]int64{1: 10, 2: 11})
		l.sweep(s, 12)
		if got := keys(l, s); len(got) != 2 {
			t.Errorf("after sweep: %v, want both kept", got)
		}
	})
}

// TestLimiterTable checks the open-addressing table against a map
// under random inserts and deletes, with tiny tables so that probe
// runs wrap around the end.
func TestLimiterTable(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, perShard := range []int{1, 2, 3, 5, 12, 100} {
		l := NewLimiter(1, time.Minute, 1)
		l.perShard, l.maxSlots = perShard, maxSlots(perShard)
		s := &l.shards[0]
		want := map[uint64]bool{}
		for range 20000 {
			k := uint64(rng.IntN(3*perShard) + 1)
			if want[k] && rng.IntN(2) == 0 {
				i, ok := s.find(k, l.hash(k))
				if !ok {
					t.Fatalf("perShard %d: key %d lost", perShard, k)
				}
				l.deleteAt(s, i)
				delete(want, k)
				continue
			}
			if want[k] || len(want) == perShard {
				continue
			}
			if len(s.slots) == 0 || (s.n+1)*4 > len(s.slots)*3 {
				l.grow(s)
			}
			i, ok := s.find(k, l.hash(k))
			if ok {
				t.Fatalf("perShard %d: deleted key %d still present", perShard, k)
			}
			s.slots[i].key = k
			s.n++
			want[k] = true
		}
		if s.n != len(want) || len(s.slots) > l.maxSlots {
			t.Fatalf("perShard %d: n %d, want %d; %d slots, max %d", perShard, s.n, len(want), len(s.slots), l.maxSlots)
		}
		for k := range want {
			if _, ok := s.find(k, l.hash(k)); !ok {
				t.Fatalf("perShard %d: key %d lost", perShard, k)
			}
		}
	}
}

func TestLimiterShardCap(t *testing.T) {
	for _, max := range []int{1, 3, 63, 64, 65, 1000} {
		l := NewLimiter(1, time.Minute, max)
		if n := len(l.shards) * l.perShard; n > max || l.perShard < 1 {
			t.Errorf("maxSources %d: %d shards × %d", max, len(l.shards), l.perShard)
		}
	}
}

// TestLimiterMemoryBound feeds a million distinct sources through a
// capped limiter and holds it to bytesPerSource per tracked source.
func TestLimiterMemoryBound(t *testing.T) {
	if testing.Short() {
		t.Skip("feeds a million sources")
	}
	const maxSources = 1 << 16
	const feed = 1_000_000
	for _, tt := range []struct {
		name string
		step time.Duration // time between connections
	}{
		{"all within one window: eviction", 0},
		{"sliding: expiry and eviction", time.Microsecond},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)

			l := NewLimiter(10, 100*time.Millisecond, maxSources)
			now := time.Now()
			var b [16]byte
			b[0], b[1] = 0x20, 0x01
			for i := range feed {
				// Alternate families so both key shapes are exercised.
				var a netip.Addr
				if i%2 == 0 {
					a = netip.AddrFrom4([4]byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
				} else {
					binary.BigEndian.PutUint32(b[4:8], uint32(i))
					a = netip.AddrFrom16(b)
				}
				l.Allow(a, now)
				now = now.Add(tt.step)
				if i%(feed/10) == 0 && l.Len() > maxSources {
					t.Fatalf("after %d sources: Len = %d > %d", i, l.Len(), maxSources)
				}
			}
			n := l.Len()
			if n > maxSources {
				t.Fatalf("Len = %d > %d", n, maxSources)
			}

			runtime.GC()
			runtime.ReadMemStats(&after)
			runtime.KeepAlive(l)
			grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
			bound := int64(maxSources*bytesPerSource + limiterShards*shardOverhead)
			t.Logf("tracked %d, heap grew %d bytes, %.1f bytes per source of the cap",
				n, grew, float64(grew)/maxSources)
			if grew > bound {
				t.Errorf("heap grew %d bytes, bound %d (%d sources × %d bytes)", grew, bound, maxSources, bytesPerSource)
			}
		})
	}
}

func TestLimiterConcurrent(t *testing.T) {
	const limit = 100
	const workers = 8
	t.Run("exact count", func(t *testing.T) {
		l := NewLimiter(limit, time.Minute, 0)
		now := time.Now()
		shared := netip.MustParseAddr("2001:db8::1")
		var allowedShared, allowedOwn atomic.Int64
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				own := netip.AddrFrom4([4]byte{10, 0, 0, byte(w)})
				for range 2000 {
					if l.Allow(shared, now) {
						allowedShared.Add(1)
					}
					if l.Allow(own, now) {
						allowedOwn.Add(1)
					}
				}
			})
		}
		wg.Wait()
		if got := allowedShared.Load(); got != limit {
			t.Errorf("shared source: %d allowed, want exactly %d", got, limit)
		}
		if got := allowedOwn.Load(); got != workers*limit {
			t.Errorf("own sources: %d allowed, want exactly %d", got, workers*limit)
		}
	})
	t.Run("churn at the cap", func(t *testing.T) {
		const maxSources = 1000
		l := NewLimiter(limit, time.Minute, maxSources)
		t0 := time.Now()
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for i := range 20000 {
					// New sources beyond the cap force sweeps, deletions
					// and evictions under contention; time moves so that
					// some expire.
					now := t0.Add(time.Duration(i) * time.Millisecond)
					l.Allow(netip.AddrFrom4([4]byte{172, byte(w), byte(i >> 8), byte(i)}), now)
					if i%100 == 0 && l.Len() > maxSources {
						t.Errorf("Len = %d > %d", l.Len(), maxSources)
						return
					}
				}
			})
		}
		wg.Wait()
		if got := l.Len(); got > maxSources {
			t.Errorf("Len = %d > %d", got, maxSources)
		}
	})
}

func TestLimiterAllocs(t *testing.T) {
	l := NewLimiter(10, time.Second, 0)
	now := time.Now()
	for _, s := range []string{"192.0.2.1", "2001:db8::1", "::ffff:192.0.2.2"} {
		a := netip.MustParseAddr(s)
		l.Allow(a, now)
		if n := testing.AllocsPerRun(100, func() { l.Allow(a, now) }); n != 0 {
			t.Errorf("Allow(%s): %v allocs/op, want 0", s, n)
		}
	}
}
