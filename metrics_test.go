package main

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/portcullis/portcullis/testnet"
	"github.com/portcullis/portcullis/testpki"
)

// scrape fetches the daemon's /metrics in the text format.
func scrape(t testing.TB, addr string) []byte {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, body)
	}
	c.CloseIdleConnections()
	return body
}

// exposition is a parsed text-format scrape: family types, and the
// sample names and label names that occur.
type exposition struct {
	types   map[string]string   // family name -> counter, gauge, histogram, ...
	samples map[string][]string // sample name -> sample lines
	labels  map[string]bool     // every label name used by a portcullis_ sample
}

var labelName = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="`)

func parseExposition(body []byte) *exposition {
	e := &exposition{types: map[string]string{}, samples: map[string][]string{}, labels: map[string]bool{}}
	for line := range strings.Lines(string(body)) {
		line = strings.TrimSuffix(line, "\n")
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(f, " ")
			e.types[name] = typ
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		name := line[:strings.IndexAny(line, "{ ")]
		e.samples[name] = append(e.samples[name], line)
		if strings.HasPrefix(name, "portcullis_") {
			if i := strings.IndexByte(line, '{'); i >= 0 {
				for _, m := range labelName.FindAllStringSubmatch(line[i:], -1) {
					e.labels[m[1]] = true
				}
			}
		}
	}
	return e
}

// seriesNames are the names a query may use: a histogram family named N
// exports N_bucket, N_sum and N_count, never N itself.
func (e *exposition) seriesNames() map[string]bool {
	names := map[string]bool{}
	for name, typ := range e.types {
		switch typ {
		case "histogram":
			names[name+"_bucket"], names[name+"_sum"], names[name+"_count"] = true, true, true
		case "summary":
			names[name], names[name+"_sum"], names[name+"_count"] = true, true, true
		default:
			names[name] = true
		}
	}
	return names
}

// startMetricsDaemon runs a daemon with one L4 and one L7 route and
// sends one connection through the L4 route, so every portcullis family
// has series. It returns the env and the proxy address.
func startMetricsDaemon(t *testing.T) (*testEnv, *daemon, string) {
	t.Helper()
	backend := testnet.NamedBackend(t, "app")
	leaf := testpki.NewCA(t).Leaf(t, "secure.test")
	env := newEnv(t)
	proxyAddr := freeAddr(t)
	env.writeConfig(t, "5s", l4Listener(proxyAddr, "app.test", backend)+fmt.Sprintf(`
  [[listener.route]]
  sni = "secure.test"
  mode = "l7"
  tls_cert = %q
  tls_key = %q
  backend = "127.0.0.1:1"
`, leaf.CertFile, leaf.KeyFile))
	d := env.start(t)
	if got, err := testnet.Ask(proxyAddr, testnet.ClientHello(t, &tls.Config{ServerName: "app.test"})); err != nil || got != "app" {
		t.Fatalf("proxied connection: %q, %v", got, err)
	}
	return env, d, proxyAddr
}

// TestMetrics scrapes a running daemon: the documented families are
// there, every portcullis_ family passes promlint, and no label value
// carries a client address.
func TestMetrics(t *testing.T) {
	env, d, _ := startMetricsDaemon(t)
	// The route counters of a connection are complete once it has been
	// logged.
	d.waitLog(t, 1, "msg=connection", "sni=app.test")
	body := scrape(t, env.metrics)
	e := parseExposition(body)

	for _, name := range []string{
		"portcullis_connections_accepted_total", "portcullis_connections_active",
		"portcullis_connections_rejected_total", "portcullis_route_connections_total",
		"portcullis_route_bytes_total", "portcullis_backend_dial_duration_seconds_bucket",
		"portcullis_relay_pipe_unavailable_total",
		"portcullis_l7_requests_total", "portcullis_l7_request_duration_seconds_bucket",
		"portcullis_config_reloads_total", "portcullis_config_last_reload_successful",
		"portcullis_config_last_reload_success_timestamp_seconds", "portcullis_config_info",
		"go_goroutines", "process_resident_memory_bytes",
	} {
		if len(e.samples[name]) == 0 {
			t.Errorf("no %s samples", name)
		}
	}
	for _, want := range []string{
		`portcullis_connections_accepted_total{listener="public"} 1`,
		`portcullis_route_connections_total{listener="public",route="app.test"} 1`,
		`portcullis_route_bytes_total{direction="backend_to_client",listener="public",route="app.test"} 4`,
		`portcullis_config_reloads_total{result="success"} 1`,
		// At 0 before the first failure: increase() cannot see a series
		// that appears at 1, so an alert on failures would miss it.
		`portcullis_config_reloads_total{result="failure"} 0`,
		`portcullis_config_reloads_total{result="unchanged"} 0`,
		`portcullis_config_last_reload_successful 1`,
		`portcullis_backend_dial_duration_seconds_count{listener="public",route="app.test"} 1`,
		`portcullis_relay_pipe_unavailable_total 0`,
	} {
		if !bytes.Contains(body, []byte(want+"\n")) {
			t.Errorf("no sample %s", want)
		}
	}

	problems, err := promlint.New(bytes.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "portcullis_") {
			t.Errorf("promlint: %s: %s", p.Metric, p.Text)
		}
	}

	var families []string
	for name := range e.types {
		if strings.HasPrefix(name, "portcullis_") {
			families = append(families, name)
		}
	}
	sort.Strings(families)
	t.Logf("portcullis families: %s", strings.Join(families, " "))
	for name, lines := range e.samples {
		if !strings.HasPrefix(name, "portcullis_") {
			continue
		}
		for _, l := range lines {
			if strings.Contains(l, "127.0.0.1:") {
				t.Errorf("a label carries an address: %s", l)
			}
		}
	}
	d.stop(t)
}

// TestServePprof follows every link of the -pprof index page on the
// metrics listener: each must be served, not only the profiles the
// runtime keeps.
func TestServePprof(t *testing.T) {
	env := newEnv(t)
	env.flags = []string{"-pprof"}
	env.writeConfig(t, "5s", l4Listener(freeAddr(t), "app.test", testnet.NamedBackend(t, "app")))
	env.start(t)
	base := "http://" + env.metrics + "/debug/pprof/"
	get := func(url string) []byte {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s, %v: %.200s", url, resp.Status, err, body)
		}
		return body
	}
	links := regexp.MustCompile(`href=['"]([^'"]+)['"]`).FindAllStringSubmatch(string(get(base)), -1)
	seen := map[string]bool{}
	for _, m := range links {
		link := m[1]
		name, _, _ := strings.Cut(link, "?")
		seen[name] = true
		if name == "profile" || name == "trace" {
			link = name + "?seconds=1" // not the default 30
		}
		get(base + link)
	}
	for _, name := range []string{"cmdline", "goroutine", "heap", "profile", "symbol", "trace"} {
		if !seen[name] {
			t.Errorf("the index does not link %s; links: %q", name, links)
		}
	}
}
