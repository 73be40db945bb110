package proxy

import "strings"

// routeTable is a listener's compiled SNI table. Lookups are two map
// probes at most and allocate nothing for lower-case names.
type routeTable struct {
	exact    map[string]*route // "app.example.com"
	wildcard map[string]*route // "*.example.com" stored under "example.com"
	fallback *route            // sni = "*"
	all      []*route          // in config order, for listing
}

func newRouteTable() *routeTable {
	return &routeTable{exact: map[string]*route{}, wildcard: map[string]*route{}}
}

// add stores r under its normalised pattern. Duplicates were rejected by
// config validation, so add does not check again.
func (t *routeTable) add(r *route) {
	t.all = append(t.all, r)
	switch {
	case r.sni == "*":
		t.fallback = r
	case strings.HasPrefix(r.sni, "*."):
		t.wildcard[r.sni[2:]] = r
	default:
		t.exact[r.sni] = r
	}
}

// lookup finds the route for a ClientHello's server name: exact name,
// then the wildcard of its parent domain (a wildcard covers exactly one
// label, as in certificates), then the default. Matching ignores case and
// one trailing dot. An empty name (no SNI) gets the default.
func (t *routeTable) lookup(sni string) *route {
	if sni == "" {
		return t.fallback
	}
	if sni[len(sni)-1] == '.' {
		sni = sni[:len(sni)-1]
	}
	if hasUpper(sni) {
		sni = strings.ToLower(sni) // rare: browsers send lower case
	}
	if r := t.exact[sni]; r != nil {
		return r
	}
	if i := strings.IndexByte(sni, '.'); i > 0 {
		if r := t.wildcard[sni[i+1:]]; r != nil {
			return r
		}
	}
	return t.fallback
}

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			return true
		}
	}
	return false
}
