// Command floor is a reference target for the load benchmark, not a
// proxy to run: the least a Go program must do to relay the benchmark's
// connections, with none of portcullis's features. It reads one TLS
// record (the ClientHello), connects to the one backend, forwards the
// record and relays both ways until both sides are done. No routing,
// firewall, PROXY protocol, timeouts, limits, logs or metrics of its own.
//
// Measured beside portcullis (`go run ./bench -floor`), it separates what
// portcullis's own work costs from what any Go relay on this machine
// pays. Two models:
//
//   - goroutines: a goroutine per connection and one more per direction,
//     blocking reads through the runtime's network poller (the model
//     portcullis uses);
//   - epoll: one event loop per GOMAXPROCS, each with its own
//     SO_REUSEPORT listener and epoll instance, every system call on a
//     connection raw and non-blocking, no goroutine per connection. The loop waits by parking its
//     epoll descriptor in the runtime's poller, so it never blocks a
//     thread in a system call.
//
// Usage: floor -model goroutines|epoll -listen ADDR -backend ADDR -metrics ADDR
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func main() {
	model := flag.String("model", "goroutines", "goroutines or epoll")
	listen := flag.String("listen", "127.0.0.1:0", "address to accept on")
	backend := flag.String("backend", "", "address every connection is relayed to")
	metrics := flag.String("metrics", "", "address for /metrics (the Go runtime's gauges, read by the idle phase)")
	flag.Parse()
	if err := run(*model, *listen, *backend, *metrics); err != nil {
		fmt.Fprintln(os.Stderr, "floor:", err)
		os.Exit(1)
	}
}

func run(model, listen, backend, metrics string) error {
	if backend == "" {
		return errors.New("-backend is required")
	}
	if metrics != "" {
		ln, err := net.Listen("tcp", metrics)
		if err != nil {
			return err
		}
		go http.Serve(ln, promhttp.Handler())
	}
	switch model {
	case "goroutines":
		return serveGoroutines(listen, backend)
	case "epoll":
		return serveEpoll(listen, backend)
	}
	return fmt.Errorf("unknown -model %q", model)
}

// recordLen is the length of the TLS record whose 5-byte header is h.
func recordLen(h []byte) int { return int(h[3])<<8 | int(h[4]) }
