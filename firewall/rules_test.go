package firewall

import (
	"net/netip"
	"strings"
	"testing"
)

func TestVerdictString(t *testing.T) {
	// These strings are metric label values; changing one breaks
	// dashboards and alerts.
	for v, want := range map[Verdict]string{
		Allow:          "allow",
		BlockedIP:      "blocked_ip",
		BlockedCountry: "blocked_country",
		RateLimited:    "rate_limited",
		Verdict(42):    "Verdict(42)",
	} {
		if got := v.String(); got != want {
			t.Errorf("Verdict(%d).String() = %q, want %q", v, got, want)
		}
	}
}

func TestRulesCheck(t *testing.T) {
	block := []string{
		"203.0.113.0/24",
		"198.51.100.7",
		"2001:db8:bad::/48",
		"2001:db8::42",
		"::ffff:192.0.2.128/121", // mapped prefix: stored as 192.0.2.128/25
		"::ffff:100.64.0.1",      // mapped address: stored as 100.64.0.1/32
		"0.0.0.0/32",
		"fe80::/10",
	}
	r, err := NewRules(block, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := r.Len(), len(block); got != want {
		t.Errorf("Len() = %d, want %d", got, want)
	}
	tests := []struct {
		addr string
		want Verdict
	}{
		// IPv4 CIDR: edges inside and just outside.
		{"203.0.113.0", BlockedIP},
		{"203.0.113.255", BlockedIP},
		{"203.0.112.255", Allow},
		{"203.0.114.0", Allow},
		// IPv4 single address.
		{"198.51.100.7", BlockedIP},
		{"198.51.100.6", Allow},
		{"198.51.100.8", Allow},
		// IPv6 CIDR.
		{"2001:db8:bad::1", BlockedIP},
		{"2001:db8:bad:ffff:ffff:ffff:ffff:ffff", BlockedIP},
		{"2001:db8:bae::", Allow},
		{"2001:db8:bac:ffff::1", Allow},
		// IPv6 single address.
		{"2001:db8::42", BlockedIP},
		{"2001:db8::43", Allow},
		{"fe80::1%eth0", BlockedIP}, // a zone does not hide an address
		// IPv4-mapped IPv6 sources are matched as IPv4.
		{"::ffff:203.0.113.9", BlockedIP},
		{"::ffff:198.51.100.7", BlockedIP},
		{"::ffff:198.51.100.6", Allow},
		// Mapped entries were stored as IPv4.
		{"192.0.2.200", BlockedIP},
		{"192.0.2.127", Allow},
		{"::ffff:192.0.2.200", BlockedIP},
		{"100.64.0.1", BlockedIP},
		{"100.64.0.2", Allow},
		// An IPv4 entry does not match an IPv6 address with the same bits.
		{"::cb00:7109", Allow}, // ::203.0.113.9, IPv4-compatible, not mapped
		{"0.0.0.0", BlockedIP},
		{"::", Allow},
		// The zero Addr is never blocked by the list.
		{"invalid", Allow},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			var a netip.Addr
			if tt.addr != "invalid" {
				a = netip.MustParseAddr(tt.addr)
			}
			if got := r.Check(a); got != tt.want {
				t.Errorf("Check(%s) = %v, want %v", tt.addr, got, tt.want)
			}
		})
	}
}

func TestRulesNilAndEmpty(t *testing.T) {
	a := netip.MustParseAddr("192.0.2.1")
	var nilRules *Rules
	if got := nilRules.Check(a); got != Allow {
		t.Errorf("nil Rules: Check = %v", got)
	}
	if got := nilRules.Len(); got != 0 {
		t.Errorf("nil Rules: Len = %d", got)
	}
	r, err := NewRules(nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Check(a); got != Allow {
		t.Errorf("empty Rules: Check = %v", got)
	}
}

func TestRulesLenMergesDuplicates(t *testing.T) {
	r, err := NewRules([]string{"192.0.2.1", "192.0.2.1/32", "::ffff:192.0.2.1", "2001:db8::/32"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Len(); got != 2 {
		t.Errorf("Len() = %d, want 2", got)
	}
}

func TestNewRulesErrors(t *testing.T) {
	geo := openTestDB(t)
	tests := []struct {
		name      string
		block     []string
		countries []string
		geo       *GeoDB
		want      string // the whole error must start with this
	}{
		{"prefix too long v4", []string{"10.0.0.0/8", "192.0.2.1", "2001:db8::/32", "10.0.0.0/33"}, nil, nil,
			`firewall: block[3] "10.0.0.0/33": `},
		{"prefix too long v6", []string{"2001:db8::/129"}, nil, nil, `firewall: block[0] "2001:db8::/129": `},
		{"host bits set", []string{"10.0.0.1/8"}, nil, nil,
			`firewall: block[0] "10.0.0.1/8": host bits set (did you mean "10.0.0.0/8"?)`},
		{"not an address", []string{"example.com"}, nil, nil, `firewall: block[0] "example.com": `},
		{"octet out of range", []string{"10.0.0.256"}, nil, nil, `firewall: block[0] "10.0.0.256": `},
		{"empty entry", []string{"10.0.0.1", ""}, nil, nil, `firewall: block[1] "": empty entry`},
		{"address with port", []string{"10.0.0.1:443"}, nil, nil, `firewall: block[0] "10.0.0.1:443": `},
		{"whitespace", []string{" 10.0.0.1"}, nil, nil, `firewall: block[0] " 10.0.0.1": `},
		{"zoned address", []string{"fe80::1%eth0"}, nil, nil, `firewall: block[0] "fe80::1%eth0": zoned address not allowed`},
		{"zoned prefix", []string{"fe80::%eth0/64"}, nil, nil, `firewall: block[0] "fe80::%eth0/64": `},
		{"countries without geo", nil, []string{"KP"}, nil,
			"firewall: block_countries is set but no GeoIP database is configured"},
		{"country too long", nil, []string{"KP", "PRK"}, geo, `firewall: block_countries[1] "PRK": not an ISO 3166-1 alpha-2`},
		{"country too short", nil, []string{"K"}, geo, `firewall: block_countries[0] "K": `},
		{"country digit", nil, []string{"K1"}, geo, `firewall: block_countries[0] "K1": `},
		{"country empty", nil, []string{""}, geo, `firewall: block_countries[0] "": `},
		{"country non-ASCII", nil, []string{"Ü"}, geo, `firewall: block_countries[0] "Ü": `},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := NewRules(tt.block, tt.countries, tt.geo)
			if err == nil {
				t.Fatalf("NewRules succeeded: %d entries", r.Len())
			}
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("error = %q\nwant prefix %q", err, tt.want)
			}
		})
	}
}

func TestRulesCountries(t *testing.T) {
	geo := openTestDB(t)
	// Codes in either case; 81.2.69.5 is also in the block list, which
	// wins because it is checked first.
	r, err := NewRules([]string{"81.2.69.5"}, []string{"kp", "Se"}, geo)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		addr string
		want Verdict
	}{
		{"81.2.69.1", BlockedCountry},
		{"::ffff:81.2.69.1", BlockedCountry},
		{"175.45.176.1", BlockedCountry},
		{"2a0b:f4c0::1", BlockedCountry},
		{"89.160.20.112", BlockedCountry}, // SE by registered country
		{"81.2.69.5", BlockedIP},
		{"8.8.8.8", Allow},
		{"2a01:4f8::1", Allow},
		{"1.0.0.1", Allow},  // unusable code in the database
		{"10.0.0.1", Allow}, // unknown country
		{"2a0c::1", Allow},  // unknown country
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			if got := r.Check(netip.MustParseAddr(tt.addr)); got != tt.want {
				t.Errorf("Check(%s) = %v, want %v", tt.addr, got, tt.want)
			}
		})
	}

	t.Run("geo without countries is not consulted", func(t *testing.T) {
		r, err := NewRules(nil, nil, geo)
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Check(netip.MustParseAddr("81.2.69.1")); got != Allow {
			t.Errorf("Check = %v, want allow", got)
		}
	})
}

func TestRulesCheckAllocs(t *testing.T) {
	geo := openTestDB(t)
	r, err := NewRules([]string{"203.0.113.0/24", "2001:db8::/32"}, []string{"KP"}, geo)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"8.8.8.8", "81.2.69.1", "203.0.113.1", "::ffff:8.8.8.8", "2a01:4f8::1", "10.1.1.1"} {
		a := netip.MustParseAddr(s)
		r.Check(a) // warm the GeoDB record cache
		if n := testing.AllocsPerRun(100, func() { r.Check(a) }); n != 0 {
			t.Errorf("Check(%s): %v allocs/op, want 0", s, n)
		}
	}
}
