package state

import "github.com/portcullis/portcullis/config"

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
	for i := range o.Routes {
		if o.Routes[i].Listener == r.Listener && o.Routes[i].SNI == r.SNI {
			o.Routes[i] = r
			return
		}
	}
	o.Routes = append(o.Routes, r)
}

// RemoveRoute drops the route override for (listener, sni) and reports
// whether there was one.
func (o *Overrides) RemoveRoute(listener, sni string) bool {
	sni = config.NormalizeSNI(sni)
	for i, r := range o.Routes {
		if r.Listener == listener && r.SNI == sni {
			o.Routes = append(o.Routes[:i:i], o.Routes[i+1:]...)
			return true
		}
	}
	return false
}

// SetFirewall inserts or replaces the override for f.Value, which must
// already be normalised (config.ParsePrefix(v).String()).
func (o *Overrides) SetFirewall(f FirewallOverride) {
	for i := range o.Firewall {
		if o.Firewall[i].Value == f.Value {
			o.Firewall[i] = f
			return
		}
	}
	o.Firewall = append(o.Firewall, f)
}

// RemoveFirewall drops the override for a normalised value.
func (o *Overrides) RemoveFirewall(value string) bool {
	for i, f := range o.Firewall {
		if f.Value == value {
			o.Firewall = append(o.Firewall[:i:i], o.Firewall[i+1:]...)
			return true
		}
	}
	return false
}

// SetListener inserts or replaces the listener setting override.
func (o *Overrides) SetListener(l ListenerOverride) {
	for i := range o.Listeners {
		if o.Listeners[i].Listener == l.Listener {
			o.Listeners[i] = l
			return
		}
	}
	o.Listeners = append(o.Listeners, l)
}

// RemoveListener drops the listener setting override.
func (o *Overrides) RemoveListener(listener string) bool {
	for i, l := range o.Listeners {
		if l.Listener == listener {
			o.Listeners = append(o.Listeners[:i:i], o.Listeners[i+1:]...)
			return true
		}
	}
	return false
}
