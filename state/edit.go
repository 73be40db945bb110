package state

import (
	"slices"

	"github.com/portcullis/portcullis/config"
)

// The methods below edit an in-memory Overrides the same way the Put and
// Clear methods edit the database, so the admin API can build the
// would-be overrides, validate them, and only then write the same change.
// Keys are normalised as the store normalises them.

// SetRoute inserts or replaces the route override for (Listener, SNI).
func (o *Overrides) SetRoute(r RouteOverride) {
	r.SNI = config.NormalizeSNI(r.SNI)
	if !r.Deleted {
		r.Route.SNI = r.SNI
	} else {
		r.Route = config.Route{}
	}
	o.Routes = upsert(o.Routes, r, func(x RouteOverride) bool { return x.Listener == r.Listener && x.SNI == r.SNI })
}

// RemoveRoute drops the route override for (listener, sni) and reports
// whether there was one.
func (o *Overrides) RemoveRoute(listener, sni string) bool {
	sni = config.NormalizeSNI(sni)
	var ok bool
	o.Routes, ok = remove(o.Routes, func(x RouteOverride) bool { return x.Listener == listener && x.SNI == sni })
	return ok
}

// SetFirewall inserts or replaces the override for f.Value, which must
// already be normalised (config.ParsePrefix(v).String()).
func (o *Overrides) SetFirewall(f FirewallOverride) {
	o.Firewall = upsert(o.Firewall, f, func(x FirewallOverride) bool { return x.Value == f.Value })
}

// RemoveFirewall drops the override for a normalised value.
func (o *Overrides) RemoveFirewall(value string) bool {
	var ok bool
	o.Firewall, ok = remove(o.Firewall, func(x FirewallOverride) bool { return x.Value == value })
	return ok
}

// SetListener inserts or replaces the listener setting override.
func (o *Overrides) SetListener(l ListenerOverride) {
	o.Listeners = upsert(o.Listeners, l, func(x ListenerOverride) bool { return x.Listener == l.Listener })
}

// RemoveListener drops the listener setting override.
func (o *Overrides) RemoveListener(listener string) bool {
	var ok bool
	o.Listeners, ok = remove(o.Listeners, func(x ListenerOverride) bool { return x.Listener == listener })
	return ok
}

// upsert replaces the element same matches, or appends v.
func upsert[T any](s []T, v T, same func(T) bool) []T {
	if i := slices.IndexFunc(s, same); i >= 0 {
		s[i] = v
		return s
	}
	return append(s, v)
}

// remove drops the element match finds. It builds a new slice rather
// than shifting in place: the slice may share its array with a Clone's
// source.
func remove[T any](s []T, match func(T) bool) ([]T, bool) {
	i := slices.IndexFunc(s, match)
	if i < 0 {
		return s, false
	}
	return append(s[:i:i], s[i+1:]...), true
}
