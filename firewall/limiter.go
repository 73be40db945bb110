package firewall

import (
	"encoding/binary"
	"math"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"
	"unsafe"
)

// DefaultMaxSources is the number of sources a Limiter tracks when
// NewLimiter is given maxSources <= 0. At the cap that is about 43 MiB
// (see Limiter), reached only when that many distinct sources connect
// within one window.
const DefaultMaxSources = 1 << 20

const (
	// ringSize counters per source, one per sub-window. A power of two
	// so that a sub-window index maps to its counter with a mask.
	ringSize = 8
	// subWindows per window: the ring holds the current sub-window
	// plus the subWindows before it, which always cover a full window.
	subWindows = ringSize - 1

	limiterShards = 64 // a power of two
	evictSample   = 8  // occupied slots a sweep inspects
	minSlots      = 8  // a shard's first table

	// bytesPerSource bounds the heap per source of maxSources: a
	// 32-byte slot in a table at most 3/4 full at the cap, 32 × 4/3.
	// shardOverhead adds, per shard, the allocator's rounding of the
	// table (under 8 KiB) and the shard header.
	bytesPerSource = 43
	shardOverhead  = 8<<10 + 64

	// v4KeyTag marks an IPv4 key. Keys of IPv6 sources are the upper 64
	// bits of the address; the tag puts IPv4 keys inside ff00::/8,
	// multicast, which is never the source of a TCP connection, so the
	// two families cannot collide.
	v4KeyTag = 0xff00_0000_0000_0000
	// zeroKey stands in for the /64 ::/64 (which holds ::1), because key
	// 0 marks an empty slot. It lies in multicast space too.
	zeroKey = 0xff00_0001_0000_0000

	maxLimit = math.MaxUint16 // counters are 16 bits
)

// Limiter is a per-source connection rate limiter: at most limit
// connections per window from one source, over a sliding window. A
// source is an IPv4 address or an IPv6 /64, because one IPv6 host
// usually owns a whole /64 and could otherwise rotate addresses freely.
// Limiter is safe for concurrent use; a nil *Limiter allows everything.
//
// Algorithm. Each source has eight counters in a ring, one per
// sub-window of window/7 (rounded up to the nanosecond). A connection is
// allowed while the sum of the current sub-window and the seven before
// it is below limit, and is then counted in the current one. That span
// always covers the whole last window, so no interval of length window,
// at a boundary or anywhere else, ever contains more than limit allowed
// connections from one tracked source: there is no 2x burst. The cost
// is coarseness on the safe side: an allowed connection keeps counting
// until its sub-window leaves the span, between window and
// window+window/7 after it was allowed. Only allowed connections count;
// a rejected attempt spends nothing, so a throttled source gets budget
// back as its old sub-windows expire. Counters are 16 bits, so limit is
// capped at 65535.
//
// Memory. At most maxSources sources are tracked (DefaultMaxSources if
// maxSources <= 0). A source's whole state is one 32-byte slot (a uint64
// key, never a string; a sub-window index; the ring) in an
// open-addressing table per shard that grows by doubling and is at most
// 3/4 full at its cap, so the heap is bounded by 43 bytes × maxSources
// plus 8 KiB per shard for allocator rounding, tracked or not: under
// 44 MiB for DefaultMaxSources. Tables do not shrink. Nothing is
// allocated per call for a tracked source.
//
// Expiry and the cap. Sources are spread over 64 shards by a seeded hash
// of the key, each with its own mutex and a cap of maxSources/64 (fewer
// shards when maxSources < 64, so the total never exceeds maxSources).
// A source idle for a window plus a sub-window has nothing left to count
// and is expired. Expiry is incremental, with no goroutine: each time a
// new source is inserted, a run of slots from a random place in its
// shard is inspected, up to 8 sources, and the expired ones deleted. If
// the shard is still at its cap, the least recently seen source of that
// sample is evicted (between equally recent ones, the one with the
// fewest connections counted), which approximates LRU. An evicted
// source is forgotten: its count restarts from zero if it returns. So
// the limit is exact while the sources active within a window fit in
// their shards; beyond that, the sources seen least recently lose their
// history first, and a client able to rotate through more than
// maxSources addresses (or /64s) can escape the limit.
//
// Time. Allow takes now so that tests can inject it; pass time.Now().
// Time is measured from NewLimiter on the monotonic clock when now
// carries a monotonic reading, so wall-clock steps do not disturb it.
// Concurrent callers may present slightly out-of-order times: a now up
// to seven sub-windows older than the source's newest sighting is
// counted in the newest sub-window (the strict choice); one further
// back restarts that source.
//
// The caller carries a Limiter across config reloads while limit and
// window are unchanged; a new Limiter starts every source from zero.
type Limiter struct {
	limit     uint32
	sub       int64 // sub-window length, nanoseconds
	origin    time.Time
	seed      uint64 // keeps shard and slot placement unpredictable
	perShard  int    // cap on sources per shard
	maxSlots  int    // table size of a shard at its cap
	shardMask uint64
	shards    []limiterShard
}

type limiterShard struct {
	shardState
	// Pad to a cache line so that two cores working on neighbouring
	// shards do not contend on one line.
	_ [64 - unsafe.Sizeof(shardState{})%64]byte
}

type shardState struct {
	mu sync.Mutex
	// slots is an open-addressing table with linear probing; key 0
	// marks an empty slot. Deletion shifts entries back instead of
	// leaving tombstones, so churn at the cap cannot inflate it.
	slots []slot
	n     int    // occupied slots
	rng   uint64 // xorshift state: where the next sweep starts
}

type slot struct {
	key uint64
	sourceState
}

// sourceState is the rate state of one source.
type sourceState struct {
	last   int64            // index of the newest sub-window seen
	counts [ringSize]uint16 // allowed connections; sub-window i at i%ringSize
}

// NewLimiter returns a limiter allowing limit connections per window
// from each source, tracking at most maxSources sources
// (DefaultMaxSources when maxSources <= 0). A limit above 65535 is
// capped at 65535. When limit <= 0 or window <= 0 it returns nil, which
// allows everything, so "no rate limit" needs no special case.
func NewLimiter(limit int, window time.Duration, maxSources int) *Limiter {
	if limit <= 0 || window <= 0 {
		return nil
	}
	if maxSources <= 0 {
		maxSources = DefaultMaxSources
	}
	shards := limiterShards
	for shards > maxSources {
		shards /= 2
	}
	perShard := maxSources / shards
	l := &Limiter{
		limit:     uint32(min(limit, maxLimit)),
		sub:       int64((window + subWindows - 1) / subWindows),
		origin:    time.Now(),
		seed:      rand.Uint64(),
		perShard:  perShard,
		maxSlots:  maxSlots(perShard),
		shardMask: uint64(shards - 1),
		shards:    make([]limiterShard, shards),
	}
	for i := range l.shards {
		l.shards[i].rng = rand.Uint64() | 1 // xorshift state must not be 0
	}
	return l
}

// maxSlots returns the table size of a shard at its cap: room for
// perShard sources at 3/4 occupancy, rounded up to fill the whole pages
// the allocator hands out for a large table anyway.
func maxSlots(perShard int) int {
	const page, large = 8 << 10, 32 << 10 // runtime page size and large-object threshold
	n := (perShard*4 + 2) / 3
	if b := n * int(unsafe.Sizeof(slot{})); b > large {
		n = (b + page - 1) / page * page / int(unsafe.Sizeof(slot{}))
	}
	return n
}

// Allow reports whether a connection from a may proceed at time now,
// and if so counts it. IPv4-mapped IPv6 addresses are keyed as IPv4. It
// does not allocate for an already-tracked source.
func (l *Limiter) Allow(a netip.Addr, now time.Time) bool {
	if l == nil {
		return true
	}
	k := sourceKey(a)
	h := l.hash(k)
	idx := floorDiv(int64(now.Sub(l.origin)), l.sub)
	s := &l.shards[h&l.shardMask]

	s.mu.Lock()
	i, ok := s.find(k, h)
	if ok {
		s.slots[i].advance(idx)
	} else {
		l.sweep(s, idx)
		if len(s.slots) == 0 || (s.n+1)*4 > len(s.slots)*3 {
			l.grow(s)
		}
		i, _ = s.find(k, h) // the sweep or growth may have moved things
		s.slots[i] = slot{key: k, sourceState: sourceState{last: idx}}
		s.n++
	}
	st := &s.slots[i].sourceState
	allowed := st.total() < l.limit
	if allowed {
		st.counts[st.last&(ringSize-1)]++
	}
	s.mu.Unlock()
	return allowed
}

// Len reports the number of tracked sources, which may include expired
// sources not yet swept.
func (l *Limiter) Len() int {
	if l == nil {
		return 0
	}
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		n += s.n
		s.mu.Unlock()
	}
	return n
}

// hash mixes a key with the limiter's random seed (the splitmix64
// finaliser), so that nobody can choose addresses that pile into one
// shard or one probe run.
func (l *Limiter) hash(k uint64) uint64 {
	x := k ^ l.seed
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// home maps a hash to a slot of an n-slot table. It uses the high bits
// of the hash; the shard was chosen by the low ones.
func home(h uint64, n int) int {
	hi, _ := bits.Mul64(h, uint64(n))
	return int(hi)
}

// find returns the slot holding k, or the empty slot where k belongs.
// The table always has an empty slot, so the probe ends.
func (s *limiterShard) find(k, h uint64) (int, bool) {
	if len(s.slots) == 0 {
		return 0, false
	}
	for i := home(h, len(s.slots)); ; {
		switch s.slots[i].key {
		case k:
			return i, true
		case 0:
			return i, false
		}
		if i++; i == len(s.slots) {
			i = 0
		}
	}
}

// grow doubles a shard's table, up to its size at the cap.
func (l *Limiter) grow(s *limiterShard) {
	n := min(max(2*len(s.slots), minSlots), l.maxSlots)
	if n <= len(s.slots) {
		return // at the cap the sweep has made room
	}
	old := s.slots
	s.slots = make([]slot, n)
	for _, sl := range old {
		if sl.key != 0 {
			i, _ := s.find(sl.key, l.hash(sl.key))
			s.slots[i] = sl
		}
	}
}

// deleteAt empties slot i and shifts later entries of the probe run
// back into the hole (Knuth's Algorithm R), so lookups stay correct
// without tombstones.
func (l *Limiter) deleteAt(s *limiterShard, i int) {
	n := len(s.slots)
	for j := i; ; {
		if j++; j == n {
			j = 0
		}
		k := s.slots[j].key
		if k == 0 {
			break
		}
		// The entry at j may fill the hole unless its home lies
		// cyclically in (i, j]: then the hole is before its home.
		h := home(l.hash(k), n)
		if i <= j && i < h && h <= j || i > j && (i < h || h <= j) {
			continue
		}
		s.slots[i] = s.slots[j]
		i = j
	}
	s.slots[i] = slot{}
	s.n--
}

// sweep runs before a new source is inserted into s: it deletes the
// expired sources among up to evictSample sources found from a random
// slot on, and if the shard is at its cap and none had expired, evicts
// the least recently seen of them.
func (l *Limiter) sweep(s *limiterShard, idx int64) {
	n := len(s.slots)
	if n == 0 {
		return
	}
	full := s.n >= l.perShard
	// A sparse table is not scanned end to end for every new source; a
	// full one is densely occupied, so its scan is short anyway and must
	// not give up before finding a victim.
	limit := min(4*evictSample, n)
	if full {
		limit = n
	}
	s.rng ^= s.rng << 13
	s.rng ^= s.rng >> 7
	s.rng ^= s.rng << 17
	i := home(s.rng, n)

	var (
		victim = -1 // slot index; stable because nothing moves unless freed
		vLast  int64
		vTotal uint32
		freed  bool
	)
	for seen, scanned := 0, 0; seen < evictSample && scanned < limit; {
		sl := &s.slots[i]
		if sl.key != 0 {
			seen++
			if idx-sl.last >= ringSize {
				l.deleteAt(s, i)
				freed = true
				continue // a later entry may have moved into slot i
			}
			if t := sl.total(); victim < 0 || sl.last < vLast || sl.last == vLast && t < vTotal {
				victim, vLast, vTotal = i, sl.last, t
			}
		}
		scanned++
		if i++; i == n {
			i = 0
		}
	}
	if full && !freed && victim >= 0 {
		l.deleteAt(s, victim)
	}
}

// advance moves the ring forward to sub-window idx, zeroing the
// counters of sub-windows that have left the span.
func (st *sourceState) advance(idx int64) {
	d := idx - st.last
	switch {
	case d == 0:
	case d < 0 && d > -ringSize:
		// An out-of-order caller: count it in the newest sub-window,
		// which keeps it counted for longer, never shorter.
	case d < 0 || d >= ringSize:
		*st = sourceState{last: idx}
	default:
		for i := st.last + 1; i <= idx; i++ {
			st.counts[i&(ringSize-1)] = 0
		}
		st.last = idx
	}
}

func (st *sourceState) total() uint32 {
	var n uint32
	for _, c := range st.counts {
		n += uint32(c)
	}
	return n
}

// sourceKey maps an address to its rate-limit key: the IPv4 address, or
// the /64 of an IPv6 address. It never returns 0.
func sourceKey(a netip.Addr) uint64 {
	a = a.Unmap()
	if a.Is4() {
		b := a.As4()
		return v4KeyTag | uint64(binary.BigEndian.Uint32(b[:]))
	}
	b := a.As16()
	if k := binary.BigEndian.Uint64(b[:8]); k != 0 {
		return k
	}
	return zeroKey
}

// floorDiv divides rounding toward negative infinity, so that times
// before the limiter's origin still fall into well-formed sub-windows.
func floorDiv(a, b int64) int64 {
	q := a / b
	if (a%b != 0) && ((a < 0) != (b < 0)) {
		q--
	}
	return q
}
