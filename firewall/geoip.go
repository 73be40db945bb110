package firewall

import (
	"bytes"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/oschwald/maxminddb-golang/v2"
)

// geoCacheSlots is the size of the per-database record cache. GeoLite2
// Country has a few thousand distinct records, which fit with room to
// spare; a City database has far more and simply misses more often.
// The slot array costs 8 bytes per slot (64 KiB).
const (
	geoCacheBits  = 13
	geoCacheSlots = 1 << geoCacheBits
)

// GeoDB is an opened MaxMind country database (GeoLite2/GeoIP2 Country,
// or City, which has the same country fields), held in memory and opened
// once per config snapshot. It is safe for concurrent use, including a
// Close that races lookups.
type GeoDB struct {
	// mu guards r against Close, so a lookup racing Close sees either
	// the open reader or none.
	mu sync.RWMutex
	r  *maxminddb.Reader

	// cache maps a record's data-section offset to its country code.
	// Many networks share one record, so after warm-up Country is a tree
	// walk plus one atomic load, with no decoding and no allocation.
	// It is two-way set-associative and lock-free; a racing overwrite
	// only costs a later re-decode.
	cache [geoCacheSlots]atomic.Pointer[geoCacheEntry]
}

type geoCacheEntry struct {
	off  uintptr
	code string
}

// OpenGeoDB opens and verifies a MaxMind database. The whole file is
// verified up front: a damaged database that opened anyway would make
// every country lookup fail, and the country block would silently fail
// open. Verification reads the whole file (about 30 ms for a 14 MB
// database), once per snapshot build. It is strict: a database whose
// metadata lacks a description, for instance, is rejected too (MaxMind's
// files have one; give mmdbwriter a Description when building one).
//
// The file is read into memory rather than memory-mapped: a mapped file
// that an operator overwrites in place (cp truncates first) faults the
// whole process with SIGBUS on the next lookup, while a copy in memory
// cannot be changed under the proxy. A country database is a few MiB,
// and one copy is shared by consecutive snapshots while the file is
// unchanged.
func OpenGeoDB(path string) (*GeoDB, error) {
	data, err := readRegular(path)
	if err != nil {
		return nil, fmt.Errorf("firewall: geoip: %w", err) // names the file
	}
	if len(data) == 0 {
		return nil, fmt.Errorf("firewall: geoip: %s: file is empty", path)
	}
	r, err := maxminddb.OpenBytes(data)
	if err != nil {
		return nil, fmt.Errorf("firewall: geoip: %s: %w", path, err)
	}
	if err := r.Verify(); err != nil {
		_ = r.Close()
		return nil, fmt.Errorf("firewall: geoip: %s: corrupt database: %w", path, err)
	}
	return &GeoDB{r: r}, nil
}

// readRegular (the same check as package regularfile, which firewall
// may not import: DESIGN.md keeps it free of the rest of the module)
// reads the whole of path if it is a regular file (or a
// symlink to one), and refuses anything else at once, naming path and
// what it is. Opening a FIFO that has no writer would block until one
// appears, and a reload holds the reload manager's lock while it opens
// the database, so every later reload and admin call would wait with
// it; O_NONBLOCK makes that open return at once, and the type is checked
// on the opened file.
func readRegular(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		// open(2) of a Unix socket fails with ENXIO; say what it is.
		if fi, serr := os.Stat(path); serr == nil && !fi.Mode().IsRegular() {
			return nil, notRegular(path, fi.Mode())
		}
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, notRegular(path, fi.Mode())
	}
	// Sized up front, as os.ReadFile does: a database is megabytes.
	var buf bytes.Buffer
	buf.Grow(int(fi.Size()) + bytes.MinRead)
	if _, err := buf.ReadFrom(f); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func notRegular(path string, m fs.FileMode) error {
	kind := "special file"
	switch {
	case m&fs.ModeNamedPipe != 0:
		kind = "named pipe"
	case m&fs.ModeSocket != 0:
		kind = "socket"
	case m&fs.ModeDevice != 0:
		kind = "device"
	case m.IsDir():
		kind = "directory"
	}
	return fmt.Errorf("%s: not a regular file (%s)", path, kind)
}

// Close releases the mapping. Lookups after Close, or racing it, report
// an unknown country. Close is idempotent.
func (g *GeoDB) Close() error {
	if g == nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.r == nil {
		return nil
	}
	err := g.r.Close()
	g.r = nil
	if err != nil {
		return fmt.Errorf("firewall: geoip: close: %w", err)
	}
	return nil
}

// Country returns the ISO 3166-1 alpha-2 code, upper-case, of the
// country the address is located in or, for networks with no location
// (some anycast and satellite ranges), the country it is registered in.
// It returns "" when the address is not in the database, the record has
// no usable code, or g is nil or closed. An IPv4-mapped IPv6 address is
// looked up as IPv4. Once a record is cached, Country does not allocate.
func (g *GeoDB) Country(a netip.Addr) string {
	if g == nil {
		return ""
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.r == nil {
		return ""
	}
	a = a.Unmap()
	// The reader would build an error (and allocate) for these.
	if !a.IsValid() || (a.Is6() && g.r.Metadata.IPVersion == 4) {
		return ""
	}
	res := g.r.Lookup(a)
	if !res.Found() {
		return ""
	}
	off := res.Offset()
	set := int((uint64(off)*0x9E3779B97F4A7C15)>>(64-geoCacheBits)) &^ 1
	e0, e1 := g.cache[set].Load(), g.cache[set+1].Load()
	switch {
	case e0 != nil && e0.off == off:
		return e0.code
	case e1 != nil && e1.off == off:
		return e1.code
	}
	code := decodeCountry(res)
	slot := set + int(off&1) // pseudo-random victim when both ways are taken
	if e0 == nil {
		slot = set
	} else if e1 == nil {
		slot = set + 1
	}
	g.cache[slot].Store(&geoCacheEntry{off: off, code: code})
	return code
}

// countryIndexOf is Country reduced to an index into the code space.
func (g *GeoDB) countryIndexOf(a netip.Addr) (int, bool) {
	return countryIndex(g.Country(a))
}

// decodeCountry reads the standard GeoIP2 country fields of a record and
// returns the code upper-cased, or "" when there is no valid code.
func decodeCountry(res maxminddb.Result) string {
	var rec struct {
		Country struct {
			ISOCode string `maxminddb:"iso_code"`
		} `maxminddb:"country"`
		RegisteredCountry struct {
			ISOCode string `maxminddb:"iso_code"`
		} `maxminddb:"registered_country"`
	}
	if err := res.Decode(&rec); err != nil {
		return ""
	}
	code := rec.Country.ISOCode
	if code == "" {
		code = rec.RegisteredCountry.ISOCode
	}
	if _, ok := countryIndex(code); !ok {
		return ""
	}
	return strings.ToUpper(code)
}
