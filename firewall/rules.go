package firewall

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/gaissmai/bart"
)

// Verdict is the outcome of a firewall check. Its String form is used as
// a metric label value, so the strings are part of the API.
type Verdict uint8

const (
	Allow Verdict = iota
	BlockedIP
	BlockedCountry
	RateLimited
)

func (v Verdict) String() string {
	switch v {
	case Allow:
		return "allow"
	case BlockedIP:
		return "blocked_ip"
	case BlockedCountry:
		return "blocked_country"
	case RateLimited:
		return "rate_limited"
	}
	return "Verdict(" + strconv.Itoa(int(v)) + ")"
}

// numCountryCodes is the size of the alpha-2 code space, AA..ZZ.
const numCountryCodes = 26 * 26

// Rules is a compiled, immutable blocklist: addresses and CIDRs, plus
// countries resolved through a GeoDB. It is safe for concurrent use and
// is built once per config snapshot.
//
// Rules keeps a reference to the GeoDB it was built with; the caller
// must keep that GeoDB open for as long as the Rules is in use. A Check
// that races the GeoDB's Close is safe but finds no country, so the
// country rule fails open for that one connection.
type Rules struct {
	// table is a multibit trie: Contains costs at most one step per
	// address byte however many prefixes are loaded.
	table bart.Lite

	// countries is a bitset over the alpha-2 code space, so a lookup is
	// one shift and one AND, with no string hashing.
	countries    [(numCountryCodes + 63) / 64]uint64
	hasCountries bool
	geo          *GeoDB
}

// NewRules compiles a blocklist.
//
// Each block entry is an IPv4 or IPv6 address (a /32 or /128) or a CIDR
// prefix. A prefix with host bits set, such as 10.0.0.1/8, is rejected
// rather than silently widened or narrowed: the operator's intent is
// ambiguous. IPv4-mapped IPv6 entries (::ffff:192.0.2.1, or a prefix of
// /96 or longer) are stored as IPv4 because Check unmaps addresses.
// Zoned addresses are rejected.
//
// Each country is an ISO 3166-1 alpha-2 code; case is ignored. Countries
// require geo. Errors name the offending entry by its config key and
// index, e.g. `firewall: block[3] "10.0.0.0/33": ...`.
func NewRules(block []string, countries []string, geo *GeoDB) (*Rules, error) {
	r := &Rules{geo: geo}
	for i, s := range block {
		p, err := parseBlockEntry(s)
		if err != nil {
			return nil, fmt.Errorf("firewall: block[%d] %q: %w", i, s, err)
		}
		r.table.Insert(p)
	}
	if len(countries) > 0 && geo == nil {
		return nil, errors.New("firewall: block_countries is set but no GeoIP database is configured")
	}
	for i, c := range countries {
		idx, ok := countryIndex(c)
		if !ok {
			return nil, fmt.Errorf("firewall: block_countries[%d] %q: not an ISO 3166-1 alpha-2 country code (two letters A-Z)", i, c)
		}
		r.countries[idx/64] |= 1 << (idx % 64)
		r.hasCountries = true
	}
	return r, nil
}

// parseBlockEntry parses one block entry into a canonical prefix.
func parseBlockEntry(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, errors.New("empty entry")
	}
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return netip.Prefix{}, err
		}
		if m := p.Masked(); m != p {
			return netip.Prefix{}, fmt.Errorf("host bits set (did you mean %q?)", m.String())
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		if a.Zone() != "" {
			return netip.Prefix{}, errors.New("zoned address not allowed")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	// Check matches unmapped addresses, so a mapped entry must be stored
	// as IPv4 or it would never match. A shorter prefix also covers
	// non-mapped IPv6 space and is kept as the IPv6 prefix it is.
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p, nil
}

// countryIndex maps a two-letter code, either case, to 0..675.
func countryIndex(c string) (int, bool) {
	if len(c) != 2 {
		return 0, false
	}
	hi, ok1 := letterIndex(c[0])
	lo, ok2 := letterIndex(c[1])
	return hi*26 + lo, ok1 && ok2
}

func letterIndex(b byte) (int, bool) {
	switch {
	case 'A' <= b && b <= 'Z':
		return int(b - 'A'), true
	case 'a' <= b && b <= 'z':
		return int(b - 'a'), true
	}
	return 0, false
}

// Check returns Allow, BlockedIP or BlockedCountry for a source address.
// An IPv4-mapped IPv6 address is checked as the IPv4 address it carries,
// so a dual-stack listener cannot be used to slip past an IPv4 entry.
// A nil *Rules allows everything. Check does not allocate.
func (r *Rules) Check(a netip.Addr) Verdict {
	if r == nil {
		return Allow
	}
	a = a.Unmap()
	if r.table.Contains(a) {
		return BlockedIP
	}
	if r.hasCountries {
		if idx, ok := r.geo.countryIndexOf(a); ok && r.countries[idx/64]&(1<<(idx%64)) != 0 {
			return BlockedCountry
		}
	}
	return Allow
}

// Len reports the number of distinct block prefixes, after duplicates
// (such as 192.0.2.1 and 192.0.2.1/32) have been merged.
func (r *Rules) Len() int {
	if r == nil {
		return 0
	}
	return r.table.Size()
}
