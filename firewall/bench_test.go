package firewall

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// Probe addresses, and the ranges the benchmark blocklists keep clear of
// so that every benchmark source is allowed.
var (
	probe4 = netip.MustParseAddr("192.0.2.77")
	probe6 = netip.MustParseAddr("2001:db8:77::1")
	clear  = []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("192.0.2.0/24"),
		netip.MustParsePrefix("2001:db8::/32"),
		netip.MustParsePrefix("8.8.8.0/24"), // in the test GeoIP database
	}
)

// bigBlocklist returns n distinct prefixes, half IPv4 (/8 to /32) and
// half IPv6 (/16 to /128), none of which overlaps the clear ranges.
func bigBlocklist(tb testing.TB, n int) []string {
	tb.Helper()
	rng := rand.New(rand.NewPCG(42, 42))
	seen := make(map[netip.Prefix]bool, n)
	out := make([]string, 0, n)
	for len(out) < n {
		var p netip.Prefix
		if len(out)%2 == 0 {
			var b [4]byte
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			p, _ = netip.AddrFrom4(b).Prefix(8 + rng.IntN(25))
		} else {
			var b [16]byte
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			b[0] = 0x20 // keep it in 2000::/3, like real unicast space
			p, _ = netip.AddrFrom16(b).Prefix(16 + rng.IntN(113))
		}
		if seen[p] || slices.ContainsFunc(clear, p.Overlaps) {
			continue
		}
		seen[p] = true
		out = append(out, p.String())
	}
	return out
}

func benchRules(b *testing.B, geo *GeoDB, countries []string) *Rules {
	b.Helper()
	r, err := NewRules(bigBlocklist(b, 100_000), countries, geo)
	if err != nil {
		b.Fatal(err)
	}
	if r.Len() != 100_000 {
		b.Fatalf("Len = %d", r.Len())
	}
	return r
}

// BenchmarkRulesCheck: an allowed address against 100,000 prefixes.
func BenchmarkRulesCheck(b *testing.B) {
	r := benchRules(b, nil, nil)
	for _, a := range []netip.Addr{probe4, probe6, netip.AddrFrom16(probe4.As16())} {
		b.Run(a.String(), func(b *testing.B) {
			if v := r.Check(a); v != Allow {
				b.Fatalf("Check = %v", v)
			}
			b.ReportAllocs()
			for b.Loop() {
				r.Check(a)
			}
		})
	}
}

// BenchmarkRulesCheckCountry adds a country rule, so an allowed address
// also costs a GeoIP lookup (served from the record cache).
func BenchmarkRulesCheckCountry(b *testing.B) {
	geo := openTestDB(b)
	r := benchRules(b, geo, []string{"KP", "SE"})
	a := netip.MustParseAddr("8.8.8.8")
	if v := r.Check(a); v != Allow {
		b.Fatalf("Check = %v", v)
	}
	b.ReportAllocs()
	for b.Loop() {
		r.Check(a)
	}
}

// trackedLimiter returns a limiter tracking n distinct sources (half
// IPv4, half IPv6 /64s) and those sources.
func trackedLimiter(b *testing.B, n int) (*Limiter, []netip.Addr, time.Time) {
	b.Helper()
	l := NewLimiter(maxLimit, 10*time.Second, 0)
	now := time.Now()
	srcs := make([]netip.Addr, n)
	for i := range srcs {
		if i%2 == 0 {
			srcs[i] = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		} else {
			srcs[i] = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, byte(i >> 16), byte(i >> 8), byte(i), 15: 1})
		}
		l.Allow(srcs[i], now)
	}
	if l.Len() != n {
		b.Fatalf("Len = %d, want %d", l.Len(), n)
	}
	return l, srcs, now
}

// BenchmarkLimiterAllow: an existing source among 1,000,000 tracked.
// "hot" repeats one source (state in cache); "spread" walks all of them
// (a cache miss per call, the realistic case for a busy edge).
func BenchmarkLimiterAllow(b *testing.B) {
	l, srcs, now := trackedLimiter(b, 1_000_000)
	b.Run("hot", func(b *testing.B) {
		b.ReportAllocs()
		a := srcs[len(srcs)/2]
		i := 0
		for b.Loop() {
			// Move time so the source keeps being allowed.
			l.Allow(a, now.Add(time.Duration(i)*time.Millisecond))
			i++
		}
	})
	b.Run("spread", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			l.Allow(srcs[i%len(srcs)], now)
			i++
		}
	})
	b.Run("spread-parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := rand.IntN(len(srcs))
			for pb.Next() {
				l.Allow(srcs[i%len(srcs)], now)
				i++
			}
		})
	})
}

// BenchmarkAllowPath is what the proxy does for every accepted
// connection that gets through: the blocklist (100,000 prefixes, plus a
// country rule in the geo cases), then the rate limiter with 1,000,000
// tracked sources. "hot" repeats one source; "spread" walks all million,
// so every call misses the CPU caches, which bounds it from below by
// memory latency, not by this code.
func BenchmarkAllowPath(b *testing.B) {
	l, srcs, now := trackedLimiter(b, 1_000_000)
	geo := openTestDB(b)
	for _, bc := range []struct {
		name      string
		countries []string
		hot       netip.Addr
	}{
		{"blocklist", nil, srcs[len(srcs)/2]},
		{"blocklist+geo", []string{"KP"}, netip.MustParseAddr("8.8.8.8")}, // a GeoIP hit
	} {
		r := benchRules(b, geo, bc.countries)
		b.Run(bc.name+"/hot", func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if r.Check(bc.hot) != Allow || !l.Allow(bc.hot, now.Add(time.Duration(i)*time.Millisecond)) {
					b.Fatalf("%s refused", bc.hot)
				}
				i++
			}
		})
		b.Run(bc.name+"/spread", func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				a := srcs[i%len(srcs)]
				if r.Check(a) != Allow || !l.Allow(a, now) {
					b.Fatalf("%s refused", a)
				}
				i++
			}
		})
	}
}

// BenchmarkLimiterNewSource: a flood of never-seen sources against a
// full limiter, so every call sweeps and evicts.
func BenchmarkLimiterNewSource(b *testing.B) {
	l := NewLimiter(10, 10*time.Second, 1<<16)
	now := time.Now()
	b.ReportAllocs()
	i := uint32(0)
	for b.Loop() {
		l.Allow(netip.AddrFrom4([4]byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)}), now)
		i++
	}
}
