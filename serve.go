package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	httppprof "net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/reload"
	"github.com/portcullis/portcullis/state"
)

func serveCmd(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "portcullis.toml", "config file")
	format := fs.String("log-format", "text", "log format: text or json")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	pprof := fs.Bool("pprof", false, "also serve /debug/pprof/ on the metrics listener")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // asked for: the usage is the answer, as for `portcullis -h`
		}
		return 2
	}
	if fs.NArg() > 0 {
		// Flags end at the first argument: without this, a file named
		// without -config, or any flag after a stray word, would be
		// ignored and the default portcullis.toml used instead.
		fmt.Fprintf(stderr, "portcullis serve: unexpected argument %q (the file goes after -config)\n", fs.Arg(0))
		fs.Usage()
		return 2
	}
	log, err := newLogger(stderr, *format, *level)
	if err != nil {
		fmt.Fprintln(stderr, "portcullis:", err)
		return 2
	}
	// net/http's transports and x/net's HTTP/2 code report a misbehaving
	// backend ("Unsolicited response received on idle HTTP channel")
	// through the standard library's logger. Like the L7 handler's own
	// net/http complaints, those become debug records of the structured
	// log, not raw lines in it that a log pipeline cannot parse and a
	// hostile backend could flood.
	stdlog.SetFlags(0)
	stdlog.SetOutput(slog.NewLogLogger(log.Handler(), slog.LevelDebug).Writer())
	if err := serve(*path, log, *pprof); err != nil {
		log.Error("exiting", "err", err)
		return 1
	}
	return 0
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("bad -log-level %q", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("bad -log-format %q (text or json)", format)
}

// serve runs the daemon until SIGTERM/SIGINT. Settings outside the
// listeners, routes and firewall (metrics and admin addresses, the
// database path) are read once here; changing them needs a restart.
func serve(path string, log *slog.Logger, pprof bool) error {
	started := time.Now()
	// Subscribe before anything else: until Notify, SIGHUP and SIGTERM
	// keep their default action and kill the process, so a reload or a
	// stop sent while the daemon starts (systemd, the kubelet) would skip
	// the drain and leave the admin socket behind. Signals that arrive
	// during startup are kept and handled once it is done; one goroutine
	// reads them for the daemon's whole life, so none is dropped however
	// long a reload or a startup step takes.
	reloadReq, stopReq, stopSignals := readSignals(log)
	defer stopSignals()

	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	store, err := state.Open(cfg.Resolve(cfg.State.Database))
	if err != nil {
		return cfg.KeyError("state.database", err)
	}
	defer store.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv := proxy.NewServer(proxy.Options{Logger: log, Registerer: reg})
	mgr := reload.New(reload.Options{Path: path, Server: srv, Store: store, Logger: log, Registry: reg})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// abort closes the proxy after a failed startup. Its listeners may
	// already have accepted connections; a daemon that could not start
	// closes them at once instead of waiting for them without limit.
	abort := func() {
		actx, acancel := context.WithCancel(context.Background())
		acancel()
		srv.Shutdown(actx)
	}
	if err := mgr.Start(ctx); err != nil {
		abort()
		return err
	}

	var metricsSrv *http.Server
	if cfg.Metrics.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Metrics.Listen)
		if err != nil {
			abort()
			return cfg.KeyError("metrics.listen", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		if pprof {
			mux.HandleFunc("/debug/pprof/", httppprof.Index)
			mux.HandleFunc("/debug/pprof/cmdline", httppprof.Cmdline)
			mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", httppprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", httppprof.Trace)
		}
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go metricsSrv.Serve(ln)
		log.Info("metrics listening", "addr", ln.Addr().String())
	}

	admin, err := startAdmin(cfg, mgr, srv, store, log, started)
	if err != nil {
		if metricsSrv != nil {
			metricsSrv.Close()
		}
		abort()
		return err
	}

	watchDone := make(chan error, 1)
	go func() {
		err := mgr.Watch(ctx)
		if err != nil {
			// Say so now, not at exit: until then only SIGHUP and the
			// admin Reload call pick up file changes.
			log.Error("config file watcher stopped; use SIGHUP to reload", "err", err)
		}
		watchDone <- err
	}()

	for _, st := range srv.Status() {
		log.Info("listening", "listener", st.Name, "addr", st.Address)
	}
wait:
	for {
		select {
		case <-stopReq:
			break wait
		default:
		}
		select {
		case <-reloadReq:
			mgr.Reload("sighup")
		case <-stopReq:
			break wait
		}
	}

	grace := mgr.Effective().Config.ShutdownGrace.D()
	log.Info("shutting down: draining connections", "grace", grace)
	cancel()
	<-watchDone
	// The proxy stops accepting first; the admin API and /metrics stay
	// up while connections drain, so operators can watch the drain.
	dctx, dcancel := context.WithTimeout(context.Background(), grace)
	defer dcancel()
	var cut *proxy.CutError
	if err := srv.Shutdown(dctx); errors.As(err, &cut) {
		log.Warn("grace period over: closed remaining connections", "connections", cut.Connections)
	}
	if admin != nil {
		admin.Stop()
	}
	if metricsSrv != nil {
		metricsSrv.Close()
	}
	log.Info("stopped")
	return nil
}

// readSignals subscribes to SIGHUP, SIGTERM and SIGINT and reads them in a
// goroutine of its own until stop is called: SIGHUPs coalesce into one
// pending reload request (ignored once stopping: a reload request,
// logrotate's say, is no reason to cut the drain), the first SIGTERM or
// SIGINT goes to stopReq, and a second one exits at once.
func readSignals(log *slog.Logger) (reloadReq <-chan struct{}, stopReq <-chan os.Signal, stop func()) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	reload := make(chan struct{}, 1)
	stopping := make(chan os.Signal, 1)
	done := make(chan struct{})
	go func() {
		stopped := false
		for {
			var sig os.Signal
			select {
			case sig = <-sigs:
			case <-done:
				return
			}
			switch {
			case sig == syscall.SIGHUP:
				if !stopped {
					select {
					case reload <- struct{}{}:
					default: // one is already pending
					}
				}
			case !stopped:
				stopped = true
				stopping <- sig
			default:
				log.Warn("second signal: exiting at once", "signal", sig.String())
				os.Exit(1)
			}
		}
	}()
	return reload, stopping, func() {
		signal.Stop(sigs)
		close(done)
	}
}
