package reload

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/state"
)

// Origin says where an effective route, firewall entry or listener
// setting came from, as the admin API lists it.
type Origin string

const (
	OriginFile           Origin = "file"             // the config file, untouched
	OriginOverride       Origin = "override"         // only an override: the file has no such entry
	OriginFileOverridden Origin = "file, overridden" // in the file, and an override sets it too
)

// Effective is the merge result.
type Effective struct {
	// Config is a clone of the file config with the overrides applied and
	// defaults filled in. The file config itself is never modified.
	Config *config.Config
	// RouteOrigins has an entry for every route in Config, keyed by
	// listener name and normalised SNI.
	RouteOrigins map[RouteKey]Origin
	// FirewallOrigins has an entry for every Config.Firewall.Block entry,
	// keyed by its normalised prefix ("192.0.2.1/32").
	FirewallOrigins map[string]Origin
	// ListenerOrigins is the origin of max_connections, per listener name.
	ListenerOrigins map[string]Origin
	// Orphans are overrides that name a listener the file does not have:
	// kept in the store, not applied, reported so an operator can clear
	// them (or bring the listener back).
	Orphans []Orphan
}

// RouteKey identifies a route: listener name and normalised SNI.
type RouteKey struct{ Listener, SNI string }

// Orphan is an override that could not be applied.
type Orphan struct {
	Kind     string // "route" or "listener"
	Listener string
	SNI      string // Kind "route" only
	Reason   string
}

// Merge returns the effective config, file ⊕ overrides (DESIGN.md,
// "Overrides: the file is the base, runtime changes win"). It is pure, so
// a file reload and an admin mutation (trying the would-be overrides)
// take the same path:
//
//	eff := reload.Merge(fileCfg, overrides)
//	if err := eff.Config.Validate(); err != nil {
//		return err // the merged config is what must be valid
//	}
//	for _, o := range eff.Orphans {
//		log.Warn("override not applied", "listener", o.Listener, "sni", o.SNI, "reason", o.Reason)
//	}
//
// Either argument may be nil. The rules:
//
//   - A route override for (listener, sni) replaces the file route with
//     the same normalised SNI in place (origin "file, overridden"), or is
//     appended after the file's routes (origin "override").
//   - A tombstone removes the file route. With no such route it does
//     nothing and is not reported: the state it asks for already holds.
//   - A route or listener override whose listener is not in the file —
//     tombstones included, since the operator should learn the listener
//     is gone — is not applied and is reported in Orphans.
//   - A firewall "add" appends the normalised value unless an equal
//     prefix is already blocked (compared via config.ParsePrefix). An add
//     that repeats a file entry marks it "file, overridden" rather than
//     "file": the marker tells the operator that deleting the line from
//     the file will not unblock the address while the override stays.
//   - A firewall "remove" drops every file entry equal to the value;
//     with none it does nothing.
//   - A listener override sets max_connections ("file, overridden").
//
// Output order is deterministic whatever the order of o: file order,
// then overrides sorted by key. Merge does not validate; the caller runs
// Config.Validate on the result.
func Merge(file *config.Config, o *state.Overrides) *Effective {
	var c *config.Config
	if file != nil {
		c = file.Clone()
	} else {
		c = &config.Config{}
	}
	if o == nil {
		o = &state.Overrides{}
	}
	// Normalises the file's SNIs, so they compare with override keys.
	// Override routes get theirs as they are applied.
	c.ApplyDefaults()
	e := &Effective{
		Config:          c,
		RouteOrigins:    map[RouteKey]Origin{},
		FirewallOrigins: map[string]Origin{},
		ListenerOrigins: map[string]Origin{},
	}
	e.mergeRoutes(o.Routes)
	e.mergeFirewall(o.Firewall)
	e.mergeListeners(o.Listeners)
	return e
}

func (e *Effective) mergeRoutes(overrides []state.RouteOverride) {
	for _, l := range e.Config.Listeners {
		for _, r := range l.Routes {
			e.RouteOrigins[RouteKey{l.Name, r.SNI}] = OriginFile
		}
	}
	// Sorted on a copy: the caller's slice may be the live overrides.
	ovs := slices.Clone(overrides)
	for i := range ovs {
		ovs[i].SNI = config.NormalizeSNI(ovs[i].SNI)
	}
	slices.SortStableFunc(ovs, func(a, b state.RouteOverride) int {
		return cmp.Or(cmp.Compare(a.Listener, b.Listener), cmp.Compare(a.SNI, b.SNI))
	})
	for _, ov := range ovs {
		l := e.Config.Listener(ov.Listener)
		if l == nil {
			reason := fmt.Sprintf("listener %q is not in the config file", ov.Listener)
			if ov.Deleted {
				reason += "; the route it hides is gone with it"
			}
			e.Orphans = append(e.Orphans, Orphan{Kind: "route", Listener: ov.Listener, SNI: ov.SNI, Reason: reason})
			continue
		}
		key := RouteKey{l.Name, ov.SNI}
		i := slices.IndexFunc(l.Routes, func(r config.Route) bool { return r.SNI == ov.SNI })
		switch {
		case ov.Deleted && i >= 0:
			l.Routes = slices.Delete(l.Routes, i, i+1)
			delete(e.RouteOrigins, key)
		case ov.Deleted:
			// Nothing to hide.
		default:
			r := ov.Route
			r.SNI = ov.SNI // the key is what the store is indexed by
			r.ApplyDefaults()
			if i >= 0 {
				l.Routes[i] = r
				e.RouteOrigins[key] = overridden(e.RouteOrigins[key])
			} else {
				l.Routes = append(l.Routes, r)
				e.RouteOrigins[key] = OriginOverride
			}
		}
	}
}

func (e *Effective) mergeFirewall(overrides []state.FirewallOverride) {
	fw := &e.Config.Firewall
	for _, b := range fw.Block {
		e.FirewallOrigins[prefixKey(b)] = OriginFile
	}
	ovs := slices.Clone(overrides)
	for i := range ovs {
		ovs[i].Value = prefixKey(ovs[i].Value)
	}
	slices.SortStableFunc(ovs, func(a, b state.FirewallOverride) int { return cmp.Compare(a.Value, b.Value) })
	for _, ov := range ovs {
		// "192.0.2.1" in the file and "192.0.2.1/32" in an override are
		// the same entry.
		same := func(b string) bool { return prefixKey(b) == ov.Value }
		switch {
		case ov.Remove:
			n := len(fw.Block)
			if fw.Block = slices.DeleteFunc(fw.Block, same); len(fw.Block) < n {
				delete(e.FirewallOrigins, ov.Value)
			}
		case slices.ContainsFunc(fw.Block, same):
			e.FirewallOrigins[ov.Value] = overridden(e.FirewallOrigins[ov.Value])
		default:
			fw.Block = append(fw.Block, ov.Value)
			e.FirewallOrigins[ov.Value] = OriginOverride
		}
	}
}

func (e *Effective) mergeListeners(overrides []state.ListenerOverride) {
	for _, l := range e.Config.Listeners {
		e.ListenerOrigins[l.Name] = OriginFile
	}
	ovs := slices.Clone(overrides)
	slices.SortStableFunc(ovs, func(a, b state.ListenerOverride) int { return cmp.Compare(a.Listener, b.Listener) })
	for _, ov := range ovs {
		l := e.Config.Listener(ov.Listener)
		if l == nil {
			e.Orphans = append(e.Orphans, Orphan{Kind: "listener", Listener: ov.Listener,
				Reason: fmt.Sprintf("listener %q is not in the config file", ov.Listener)})
			continue
		}
		l.MaxConnections = ov.MaxConnections
		e.ListenerOrigins[l.Name] = OriginFileOverridden
	}
}

// overridden is the origin of an entry an override has just set: a file
// entry becomes "file, overridden"; one only an override made stays so.
func overridden(prev Origin) Origin {
	if prev == OriginOverride {
		return OriginOverride
	}
	return OriginFileOverridden
}

// prefixKey is the form firewall entries are compared and keyed by. An
// entry that does not parse (an invalid file: Validate will say so) is
// keyed by its text.
func prefixKey(s string) string {
	p, err := config.ParsePrefix(s)
	if err != nil {
		return s
	}
	return p.String()
}
