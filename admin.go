package main

import (
	"log/slog"
	"time"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/reload"
	"github.com/portcullis/portcullis/rpc"
	"github.com/portcullis/portcullis/state"
)

// startAdmin serves the gRPC admin API on the sockets [admin] names.
func startAdmin(cfg *config.Config, mgr *reload.Manager, srv *proxy.Server, store *state.Store, log *slog.Logger, started time.Time) (*rpc.Running, error) {
	api := rpc.NewServer(rpc.Options{Manager: mgr, Proxy: srv, Store: store, Version: version, Started: started, Logger: log})
	run, err := rpc.Listen(cfg, api, log)
	if err != nil {
		return nil, err
	}
	for _, a := range run.Addrs() {
		log.Info("admin API listening", "addr", a.String())
	}
	return run, nil
}
