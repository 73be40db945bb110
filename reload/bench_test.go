package reload

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/portcullis/portcullis/config"
	"github.com/portcullis/portcullis/proxy"
	"github.com/portcullis/portcullis/state"
	"github.com/portcullis/portcullis/testnet"
)

// bigConfig has n routes on one listener, half exact names and half
// wildcards.
func bigConfig(n int, backend string) string {
	var b strings.Builder
	b.WriteString("[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n")
	for i := 0; i < n; i++ {
		sni := fmt.Sprintf("host%d.example.com", i)
		if i%2 == 1 {
			sni = fmt.Sprintf("*.zone%d.example.net", i)
		}
		fmt.Fprintf(&b, "[[listener.route]]\nsni = %q\nbackend = %q\n", sni, backend)
	}
	return b.String()
}

// BenchmarkParse10kRoutes measures decoding and validating the file.
func BenchmarkParse10kRoutes(b *testing.B) {
	data := []byte(bigConfig(10000, "127.0.0.1:9"))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := config.Parse("big.toml", data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCompileSwap10kRoutes measures what a reload does after
// parsing: merge overrides, validate, compile the snapshot and swap it in.
func BenchmarkCompileSwap10kRoutes(b *testing.B) {
	cfg, err := config.Parse("big.toml", []byte(bigConfig(10000, "127.0.0.1:9")))
	if err != nil {
		b.Fatal(err)
	}
	srv := proxy.NewServer(proxy.Options{})
	defer srv.Shutdown(context.Background())
	m := New(Options{Path: "big.toml", Server: srv})
	m.mu.Lock()
	defer m.mu.Unlock()
	b.ReportAllocs()
	for b.Loop() {
		if err := m.publish(cfg, &state.Overrides{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSaveToLive measures the time from an editor-style save
// (write a temp file, rename it over the config) to the first connection
// routed by the new rule, debounce included. It reports the median.
func BenchmarkSaveToLive(b *testing.B) {
	backends := []string{testnet.NamedBackend(b, "A"), testnet.NamedBackend(b, "B")}
	dir := b.TempDir()
	path := filepath.Join(dir, "portcullis.toml")
	os.WriteFile(path, []byte(appConfig(backends[0])), 0o644)
	srv := proxy.NewServer(proxy.Options{})
	m := New(Options{Path: path, Server: srv})
	if err := m.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Watch(ctx); close(done) }()
	defer func() { cancel(); <-done; srv.Shutdown(context.Background()) }()
	hello := testnet.ClientHello(b, &tls.Config{ServerName: "app.test"})
	addr := srv.Addr("l").String()
	time.Sleep(100 * time.Millisecond) // let the watcher settle

	var samples []time.Duration
	for i := 0; b.Loop(); i++ {
		want := []string{"B", "A"}[i%2]
		tmp := filepath.Join(dir, "tmp.toml")
		os.WriteFile(tmp, []byte(appConfig(backends[(i+1)%2])), 0o644)
		start := time.Now()
		os.Rename(tmp, path)
		for {
			if got, _ := testnet.Ask(addr, hello); got == want {
				break
			}
			if time.Since(start) > 10*time.Second {
				b.Fatalf("new route not live after 10s")
			}
			time.Sleep(time.Millisecond)
		}
		samples = append(samples, time.Since(start))
	}
	slices.Sort(samples)
	b.ReportMetric(float64(samples[len(samples)/2].Microseconds())/1000, "median-ms")
}
