// Package rpc is the admin API: the gRPC service (package
// portcullis.admin.v1, generated into adminpb), the server that serves
// it on a Unix socket and/or TCP with TLS, and a Go client.
//
// Every mutation follows one path, reload.Manager.Mutate: the change is
// applied to a copy of the stored overrides, the would-be effective
// config is validated and compiled, then the change is written to
// SQLite, then the new snapshot is published. A failure at any step
// leaves memory and database as they were.
//
//	srv := rpc.NewServer(rpc.Options{Manager: mgr, Proxy: px, Store: store})
//	run, err := rpc.Listen(cfg, srv, log)  // [admin] unix_socket / listen
//	defer run.Stop()
package rpc

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/reload"
	"github.com/portcullis/portcullis/rpc/adminpb"
	"github.com/portcullis/portcullis/state"
)

// Options wire the admin service to the daemon.
type Options struct {
	Manager *reload.Manager
	Proxy   *proxy.Server
	Store   *state.Store
	Version string
	Started time.Time
	Logger  *slog.Logger
}

// Server implements adminpb.AdminServer.
type Server struct {
	adminpb.UnimplementedAdminServer
	o   Options
	log *slog.Logger
}

// NewServer returns the admin service.
func NewServer(o Options) *Server {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Started.IsZero() {
		o.Started = time.Now()
	}
	return &Server{o: o, log: o.Logger}
}

func (s *Server) GetStatus(ctx context.Context, _ *adminpb.GetStatusRequest) (*adminpb.GetStatusResponse, error) {
	st := s.o.Manager.Status()
	eff := s.o.Manager.Effective()
	resp := &adminpb.GetStatusResponse{
		Version:           s.o.Version,
		UptimeSeconds:     int64(time.Since(s.o.Started).Seconds()),
		ConfigPath:        st.Path,
		ConfigHash:        st.Hash,
		LastReload:        reloadStatus(st),
		OrphanedOverrides: int32(len(eff.Orphans)),
	}
	for _, l := range s.o.Proxy.Status() {
		resp.Listeners = append(resp.Listeners, &adminpb.ListenerStatus{
			Name:                 l.Name,
			Address:              l.Address,
			ActiveConnections:    l.Active,
			TotalConnections:     l.Total,
			MaxConnections:       l.MaxConnections,
			ProxyProtocol:        l.ProxyProtocol,
			Rejected:             l.Rejected,
			MaxConnectionsOrigin: string(eff.ListenerOrigins[l.Name]),
		})
	}
	return resp, nil
}

func reloadStatus(st reload.Status) *adminpb.ReloadStatus {
	r := &adminpb.ReloadStatus{Result: st.LastResult, Error: st.LastError, Trigger: st.LastTrigger}
	if !st.LastAttempt.IsZero() {
		r.AttemptedUnix = st.LastAttempt.Unix()
	}
	if !st.LastSuccess.IsZero() {
		r.SucceededUnix = st.LastSuccess.Unix()
	}
	return r
}

func (s *Server) ListRoutes(ctx context.Context, req *adminpb.ListRoutesRequest) (*adminpb.ListRoutesResponse, error) {
	eff := s.o.Manager.Effective()
	if req.Listener != "" && eff.Config.Listener(req.Listener) == nil {
		return nil, status.Errorf(codes.NotFound, "no listener %q", req.Listener)
	}
	resp := &adminpb.ListRoutesResponse{}
	for _, l := range eff.Config.Listeners {
		if req.Listener != "" && l.Name != req.Listener {
			continue
		}
		for _, r := range l.Routes {
			pr := routeToPB(l.Name, r)
			pr.Origin = string(eff.RouteOrigins[reload.RouteKey{Listener: l.Name, SNI: r.SNI}])
			resp.Routes = append(resp.Routes, pr)
		}
	}
	return resp, nil
}

func (s *Server) PutRoute(ctx context.Context, req *adminpb.PutRouteRequest) (*adminpb.PutRouteResponse, error) {
	if req.Route == nil {
		return nil, invalid("route", errors.New("required"))
	}
	r, err := routeFromPB(req.Route)
	if err != nil {
		return nil, err
	}
	if err := s.requireListener(req.Route.Listener); err != nil {
		return nil, err
	}
	ro := state.RouteOverride{Listener: req.Route.Listener, SNI: r.SNI, Route: r, Actor: actor(ctx), UpdatedAt: time.Now().UTC()}
	err = s.o.Manager.Mutate(ctx,
		func(o *state.Overrides) error { o.SetRoute(ro); return nil },
		func(ctx context.Context, st *state.Store) error { return st.PutRoute(ctx, ro) })
	if err != nil {
		return nil, s.mutationError("put route", err)
	}
	s.log.Info("admin: route set", "listener", ro.Listener, "sni", ro.SNI, "backend", r.Backend, "actor", ro.Actor)
	out := routeToPB(ro.Listener, r)
	out.Origin = string(s.o.Manager.Effective().RouteOrigins[reload.RouteKey{Listener: ro.Listener, SNI: r.SNI}])
	return &adminpb.PutRouteResponse{Route: out}, nil
}

func (s *Server) DeleteRoute(ctx context.Context, req *adminpb.DeleteRouteRequest) (*adminpb.DeleteRouteResponse, error) {
	if err := s.requireListener(req.Listener); err != nil {
		return nil, err
	}
	sni := config.NormalizeSNI(req.Sni)
	if sni == "" {
		return nil, invalid("sni", errors.New("required"))
	}
	eff := s.o.Manager.Effective()
	origin, ok := eff.RouteOrigins[reload.RouteKey{Listener: req.Listener, SNI: sni}]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "listener %q has no route for sni %q", req.Listener, sni)
	}
	var err error
	if origin == reload.OriginOverride {
		// Only an override made this route: dropping the override
		// removes it, and leaves no tombstone to hide a route the file
		// may add later.
		// The origin was read before Mutate took its lock: a racing
		// delete may have dropped the override since.
		err = s.o.Manager.Mutate(ctx,
			func(o *state.Overrides) error {
				if !o.RemoveRoute(req.Listener, sni) {
					return status.Errorf(codes.NotFound, "listener %q has no route for sni %q", req.Listener, sni)
				}
				return nil
			},
			func(ctx context.Context, st *state.Store) error { return st.ClearRoute(ctx, req.Listener, sni) })
	} else {
		ro := state.RouteOverride{Listener: req.Listener, SNI: sni, Deleted: true, Actor: actor(ctx), UpdatedAt: time.Now().UTC()}
		err = s.o.Manager.Mutate(ctx,
			func(o *state.Overrides) error { o.SetRoute(ro); return nil },
			func(ctx context.Context, st *state.Store) error { return st.PutRoute(ctx, ro) })
	}
	if err != nil {
		return nil, s.mutationError("delete route", err)
	}
	s.log.Info("admin: route deleted", "listener", req.Listener, "sni", sni, "actor", actor(ctx))
	return &adminpb.DeleteRouteResponse{}, nil
}

func (s *Server) ListFirewallRules(ctx context.Context, _ *adminpb.ListFirewallRulesRequest) (*adminpb.ListFirewallRulesResponse, error) {
	eff := s.o.Manager.Effective()
	resp := &adminpb.ListFirewallRulesResponse{BlockCountries: eff.Config.Firewall.BlockCountries}
	for _, b := range eff.Config.Firewall.Block {
		v := normalized(b)
		resp.Rules = append(resp.Rules, &adminpb.FirewallRule{Value: v, Origin: string(eff.FirewallOrigins[v])})
	}
	return resp, nil
}

func (s *Server) AddFirewallRule(ctx context.Context, req *adminpb.AddFirewallRuleRequest) (*adminpb.AddFirewallRuleResponse, error) {
	v, err := firewallValue(req.Value)
	if err != nil {
		return nil, err
	}
	f := state.FirewallOverride{Value: v, Actor: actor(ctx), UpdatedAt: time.Now().UTC()}
	err = s.o.Manager.Mutate(ctx,
		func(o *state.Overrides) error { o.SetFirewall(f); return nil },
		func(ctx context.Context, st *state.Store) error { return st.PutFirewall(ctx, f) })
	if err != nil {
		return nil, s.mutationError("add firewall rule", err)
	}
	s.log.Info("admin: firewall rule added", "value", v, "actor", f.Actor)
	origin := s.o.Manager.Effective().FirewallOrigins[v]
	return &adminpb.AddFirewallRuleResponse{Rule: &adminpb.FirewallRule{Value: v, Origin: string(origin)}}, nil
}

func (s *Server) RemoveFirewallRule(ctx context.Context, req *adminpb.RemoveFirewallRuleRequest) (*adminpb.RemoveFirewallRuleResponse, error) {
	v, err := firewallValue(req.Value)
	if err != nil {
		return nil, err
	}
	origin, ok := s.o.Manager.Effective().FirewallOrigins[v]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no firewall rule %q", v)
	}
	if origin == reload.OriginOverride {
		err = s.o.Manager.Mutate(ctx,
			func(o *state.Overrides) error {
				if !o.RemoveFirewall(v) { // a racing remove got there first
					return status.Errorf(codes.NotFound, "no firewall rule %q", v)
				}
				return nil
			},
			func(ctx context.Context, st *state.Store) error { return st.ClearFirewall(ctx, v) })
	} else {
		f := state.FirewallOverride{Value: v, Remove: true, Actor: actor(ctx), UpdatedAt: time.Now().UTC()}
		err = s.o.Manager.Mutate(ctx,
			func(o *state.Overrides) error { o.SetFirewall(f); return nil },
			func(ctx context.Context, st *state.Store) error { return st.PutFirewall(ctx, f) })
	}
	if err != nil {
		return nil, s.mutationError("remove firewall rule", err)
	}
	s.log.Info("admin: firewall rule removed", "value", v, "actor", actor(ctx))
	return &adminpb.RemoveFirewallRuleResponse{}, nil
}

func (s *Server) SetListenerMaxConnections(ctx context.Context, req *adminpb.SetListenerMaxConnectionsRequest) (*adminpb.SetListenerMaxConnectionsResponse, error) {
	if req.MaxConnections < 0 || req.MaxConnections > 1<<31-1 {
		return nil, invalid("max_connections", errors.New("must be between 0 (unlimited) and 2147483647"))
	}
	if err := s.requireListener(req.Listener); err != nil {
		return nil, err
	}
	l := state.ListenerOverride{Listener: req.Listener, MaxConnections: int(req.MaxConnections), Actor: actor(ctx), UpdatedAt: time.Now().UTC()}
	err := s.o.Manager.Mutate(ctx,
		func(o *state.Overrides) error { o.SetListener(l); return nil },
		func(ctx context.Context, st *state.Store) error { return st.PutListener(ctx, l) })
	if err != nil {
		return nil, s.mutationError("set max_connections", err)
	}
	s.log.Info("admin: max_connections set", "listener", l.Listener, "max_connections", l.MaxConnections, "actor", l.Actor)
	return &adminpb.SetListenerMaxConnectionsResponse{}, nil
}

func (s *Server) ListOverrides(ctx context.Context, _ *adminpb.ListOverridesRequest) (*adminpb.ListOverridesResponse, error) {
	o := s.o.Manager.Overrides()
	orphans := map[[3]string]string{}
	for _, or := range s.o.Manager.Effective().Orphans {
		orphans[[3]string{or.Kind, or.Listener, or.SNI}] = or.Reason
	}
	resp := &adminpb.ListOverridesResponse{}
	for _, r := range o.Routes {
		pb := &adminpb.Override{Kind: "route", Listener: r.Listener, Sni: r.SNI, Action: "set", Actor: r.Actor, UpdatedUnix: r.UpdatedAt.Unix()}
		if r.Deleted {
			pb.Action = "delete"
		} else {
			pb.Route = routeToPB(r.Listener, r.Route)
		}
		pb.OrphanReason, pb.Orphaned = orphans[[3]string{"route", r.Listener, r.SNI}]
		resp.Overrides = append(resp.Overrides, pb)
	}
	for _, f := range o.Firewall {
		action := "add"
		if f.Remove {
			action = "remove"
		}
		resp.Overrides = append(resp.Overrides, &adminpb.Override{Kind: "firewall", Value: f.Value, Action: action, Actor: f.Actor, UpdatedUnix: f.UpdatedAt.Unix()})
	}
	for _, l := range o.Listeners {
		pb := &adminpb.Override{Kind: "listener", Listener: l.Listener, Action: "set", MaxConnections: int64(l.MaxConnections), Actor: l.Actor, UpdatedUnix: l.UpdatedAt.Unix()}
		pb.OrphanReason, pb.Orphaned = orphans[[3]string{"listener", l.Listener, ""}]
		resp.Overrides = append(resp.Overrides, pb)
	}
	// Field by field: concatenated keys would sort listener "pub"'s
	// routes after "public"'s when their SNIs differ.
	slices.SortStableFunc(resp.Overrides, func(a, b *adminpb.Override) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Listener, b.Listener), cmp.Compare(a.Sni, b.Sni), cmp.Compare(a.Value, b.Value))
	})
	return resp, nil
}

func (s *Server) ClearOverride(ctx context.Context, req *adminpb.ClearOverrideRequest) (*adminpb.ClearOverrideResponse, error) {
	var change func(*state.Overrides) error
	var write func(context.Context, *state.Store) error
	switch req.Kind {
	case "route":
		sni := config.NormalizeSNI(req.Sni)
		if req.Listener == "" {
			return nil, invalid("listener", errors.New("required"))
		}
		if sni == "" {
			return nil, invalid("sni", errors.New("required"))
		}
		change = func(o *state.Overrides) error {
			if !o.RemoveRoute(req.Listener, sni) {
				return status.Errorf(codes.NotFound, "no route override for listener %q sni %q", req.Listener, sni)
			}
			return nil
		}
		write = func(ctx context.Context, st *state.Store) error { return st.ClearRoute(ctx, req.Listener, sni) }
	case "firewall":
		v, err := firewallValue(req.Value)
		if err != nil {
			return nil, err
		}
		change = func(o *state.Overrides) error {
			if !o.RemoveFirewall(v) {
				return status.Errorf(codes.NotFound, "no firewall override for %q", v)
			}
			return nil
		}
		write = func(ctx context.Context, st *state.Store) error { return st.ClearFirewall(ctx, v) }
	case "listener":
		if req.Listener == "" {
			return nil, invalid("listener", errors.New("required"))
		}
		change = func(o *state.Overrides) error {
			if !o.RemoveListener(req.Listener) {
				return status.Errorf(codes.NotFound, "no listener override for %q", req.Listener)
			}
			return nil
		}
		write = func(ctx context.Context, st *state.Store) error { return st.ClearListener(ctx, req.Listener) }
	default:
		return nil, invalid("kind", fmt.Errorf("%q is not route, firewall or listener", req.Kind))
	}
	if err := s.o.Manager.Mutate(ctx, change, write); err != nil {
		return nil, s.mutationError("clear override", err)
	}
	s.log.Info("admin: override cleared", "kind", req.Kind, "listener", req.Listener, "sni", req.Sni, "value", req.Value, "actor", actor(ctx))
	return &adminpb.ClearOverrideResponse{}, nil
}

func (s *Server) ClearAllOverrides(ctx context.Context, _ *adminpb.ClearAllOverridesRequest) (*adminpb.ClearAllOverridesResponse, error) {
	var n int
	err := s.o.Manager.Mutate(ctx,
		func(o *state.Overrides) error { *o = state.Overrides{}; return nil },
		func(ctx context.Context, st *state.Store) (err error) { n, err = st.ClearAll(ctx); return err })
	if err != nil {
		return nil, s.mutationError("clear all overrides", err)
	}
	s.log.Info("admin: all overrides cleared", "count", n, "actor", actor(ctx))
	return &adminpb.ClearAllOverridesResponse{Cleared: int32(n)}, nil
}

func (s *Server) Reload(ctx context.Context, _ *adminpb.ReloadRequest) (*adminpb.ReloadResponse, error) {
	err := s.o.Manager.Reload("admin")
	st := s.o.Manager.Status()
	if errors.Is(err, proxy.ErrShuttingDown) {
		return nil, status.Errorf(codes.Unavailable, "reload: %v", err)
	}
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "reload failed, previous configuration still serving: %v", err)
	}
	return &adminpb.ReloadResponse{Status: reloadStatus(st), ConfigHash: st.Hash}, nil
}

// snapshotChunk is the largest piece of the database sent per message,
// well under gRPC's default 4 MiB message limit.
const snapshotChunk = 256 << 10

func (s *Server) Snapshot(_ *adminpb.SnapshotRequest, stream adminpb.Admin_SnapshotServer) error {
	if s.o.Store == nil {
		// Like reload.Manager, the service runs without a store; a nil
		// one must not crash the daemon (gRPC does not recover panics).
		return status.Error(codes.FailedPrecondition, "snapshot: no database is configured")
	}
	w := &chunkWriter{send: func(b []byte) error { return stream.Send(&adminpb.SnapshotChunk{Data: b}) }}
	if _, err := s.o.Store.Backup(stream.Context(), w); err != nil {
		return status.Errorf(codes.Internal, "snapshot: %v", err)
	}
	return nil
}

type chunkWriter struct{ send func([]byte) error }

func (w *chunkWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), snapshotChunk)
		// Send may keep the slice until it is marshalled; copy so the
		// caller can reuse its buffer.
		if err := w.send(append([]byte(nil), p[:k]...)); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// requireListener checks that the file declares the listener: overrides
// can change a listener's routes and settings but not create one.
func (s *Server) requireListener(name string) error {
	if name == "" {
		return invalid("listener", errors.New("required"))
	}
	if s.o.Manager.Effective().Config.Listener(name) == nil {
		return status.Errorf(codes.NotFound, "no listener %q in the configuration", name)
	}
	return nil
}

// mutationError maps a failed Mutate to a gRPC status: a change the
// effective config rejects is FailedPrecondition (with the key at
// fault), a gRPC status from the change itself passes through, a
// listener a reload removed since it was checked is NotFound, a daemon
// that is shutting down is Unavailable, and anything else (the database
// write) is Internal.
func (s *Server) mutationError(what string, err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	if errors.Is(err, proxy.ErrShuttingDown) {
		return status.Errorf(codes.Unavailable, "%s: %v (nothing changed)", what, err)
	}
	if errors.Is(err, reload.ErrNoListener) {
		// The listener was checked, then a reload removed it before the
		// change could be made.
		return status.Errorf(codes.NotFound, "%s: %v", what, err)
	}
	if errors.Is(err, reload.ErrRejected) {
		st := status.New(codes.FailedPrecondition, what+": "+err.Error())
		if f := config.Field(err); f != "" {
			if d, derr := st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: f, Description: err.Error()}}}); derr == nil {
				st = d
			}
		}
		return st.Err()
	}
	s.log.Error("admin: "+what+" failed; nothing changed", "err", err)
	return status.Errorf(codes.Internal, "%s: %v (nothing changed)", what, err)
}

// invalid is an InvalidArgument status naming the field.
func invalid(field string, err error) error {
	st := status.New(codes.InvalidArgument, field+": "+err.Error())
	if d, derr := st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: field, Description: err.Error()}}}); derr == nil {
		st = d
	}
	return st.Err()
}

// firewallValue is a blocklist entry as the admin API takes it: what the
// file takes (config.ParsePrefix, and no zone, which ParsePrefix would
// silently drop, blocking the address on every interface), normalised.
func firewallValue(v string) (string, error) {
	p, err := config.ParsePrefix(v)
	if err != nil {
		return "", invalid("value", err)
	}
	if strings.Contains(v, "%") {
		return "", invalid("value", fmt.Errorf("%q has a zone; block entries are addresses or CIDRs without one", v))
	}
	return p.String(), nil
}

func normalized(v string) string {
	if p, err := config.ParsePrefix(v); err == nil {
		return p.String()
	}
	return v
}

func routeToPB(listener string, r config.Route) *adminpb.Route {
	pr := &adminpb.Route{
		Listener:          listener,
		Sni:               r.SNI,
		Backend:           r.Backend,
		Mode:              r.Mode,
		SendProxyProtocol: r.SendProxyProtocol,
		TlsCert:           r.TLSCert,
		TlsKey:            r.TLSKey,
		BackendProtocol:   r.BackendProtocol,
		BackendCa:         r.BackendCA,
		BackendServerName: r.BackendServerName,
	}
	if r.ResponseTimeout != 0 {
		pr.ResponseTimeout = r.ResponseTimeout.D().String()
	}
	return pr
}

// routeFromPB converts and validates a route on its own, so a bad value
// is InvalidArgument naming the field before anything else runs.
func routeFromPB(p *adminpb.Route) (config.Route, error) {
	r := config.Route{
		SNI:               p.Sni,
		Backend:           p.Backend,
		Mode:              p.Mode,
		SendProxyProtocol: p.SendProxyProtocol,
		TLSCert:           p.TlsCert,
		TLSKey:            p.TlsKey,
		BackendProtocol:   p.BackendProtocol,
		BackendCA:         p.BackendCa,
		BackendServerName: p.BackendServerName,
	}
	if p.ResponseTimeout != "" {
		if err := r.ResponseTimeout.UnmarshalText([]byte(p.ResponseTimeout)); err != nil {
			return r, invalid("route.response_timeout", err)
		}
		if r.ResponseTimeout == 0 {
			// As in the file: a zero would read as the field left out
			// and silently become the default.
			return r, invalid("route.response_timeout", fmt.Errorf("%q: must be more than zero; leave it out for the default", p.ResponseTimeout))
		}
	}
	if err := config.CheckBackendHost(p.Backend); err != nil {
		return r, invalid("route.backend", err)
	}
	r.ApplyDefaults()
	if err := r.Validate(); err != nil {
		// The field goes in the key; the message is the inner error so
		// the field is not named twice ("route.sni: sni: ...").
		inner := err
		if u := errors.Unwrap(err); u != nil {
			inner = u
		}
		return r, invalid("route."+config.Field(err), inner)
	}
	return r, nil
}
