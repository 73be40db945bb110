package main

// The examples are documentation; these tests keep them true. Every
// config under examples/ (including the one embedded in the Kubernetes
// ConfigMap) must pass `portcullis check`; the L7 and PROXY-chain
// examples are also run, with their ports moved to free ones; and the
// Grafana dashboard may only query metrics and labels the daemon exports.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/portcullis/portcullis/testnet"
)

const examplesDir = "examples"

// yamlTOMLBlock matches a YAML key holding a TOML file as a literal
// block scalar, e.g. `  portcullis.toml: |`.
var yamlTOMLBlock = regexp.MustCompile(`^(\s*)([\w.-]+\.toml):\s*\|[-+]?\s*$`)

// embeddedTOML returns the TOML files embedded in a YAML document as
// literal blocks (a ConfigMap's data), by key, de-indented.
func embeddedTOML(yaml string) map[string]string {
	lines := strings.Split(yaml, "\n")
	out := map[string]string{}
	for i := 0; i < len(lines); i++ {
		m := yamlTOMLBlock.FindStringSubmatch(lines[i])
		if m == nil {
			continue
		}
		keyIndent, bodyIndent := len(m[1]), -1
		var body []string
		for i+1 < len(lines) {
			l := lines[i+1]
			indent := len(l) - len(strings.TrimLeft(l, " "))
			if strings.TrimSpace(l) != "" {
				if indent <= keyIndent {
					break
				}
				if bodyIndent < 0 {
					bodyIndent = indent
				}
				l = l[min(indent, bodyIndent):]
			} else {
				l = ""
			}
			body = append(body, l)
			i++
		}
		out[m[2]] = strings.TrimRight(strings.Join(body, "\n"), "\n") + "\n"
	}
	return out
}

// TestExamplesCheck runs `portcullis check` on every config in examples/,
// the way an operator would.
func TestExamplesCheck(t *testing.T) {
	var checked []string
	err := filepath.WalkDir(examplesDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		switch filepath.Ext(path) {
		case ".toml":
			checked = append(checked, path)
			t.Run(path, func(t *testing.T) { requireCheck(t, path) })
		case ".yaml", ".yml":
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for name, content := range embeddedTOML(string(data)) {
				label := path + ":" + name
				checked = append(checked, label)
				t.Run(label, func(t *testing.T) {
					file := filepath.Join(t.TempDir(), name)
					writeFile(t, file, content)
					requireCheck(t, file)
				})
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(checked)
	want := []string{
		"examples/kubernetes/configmap.yaml:portcullis.toml",
		"examples/l7.toml",
		"examples/proxy-chain.toml",
		"examples/quickstart.toml",
	}
	for _, w := range want {
		if i := sort.SearchStrings(checked, w); i == len(checked) || checked[i] != w {
			t.Errorf("example %s was not found or not checked (checked: %v)", w, checked)
		}
	}
}

func requireCheck(t *testing.T, path string) {
	t.Helper()
	code, stdout, stderr := runCmd("check", "-config", path)
	if code != 0 || !strings.Contains(stdout, "config OK") {
		t.Fatalf("portcullis check -config %s: exit %d\n%s%s", path, code, stdout, stderr)
	}
}

func TestExamplesEmbeddedTOML(t *testing.T) {
	got := embeddedTOML("data:\n  a.toml: |\n    x = 1\n\n      [t]\n    y = 2\n  other: v\n  b.toml: |-\n    z = 3\n")
	want := map[string]string{"a.toml": "x = 1\n\n  [t]\ny = 2\n", "b.toml": "z = 3\n"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("embeddedTOML = %q, want %q", got, want)
	}
}

// TestExamplesREADME: examples/README.md mentions every example.
func TestExamplesREADME(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(examplesDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(examplesDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "README.md" || strings.HasSuffix(e.Name(), ".db") || strings.HasSuffix(e.Name(), ".sock") ||
			strings.Contains(e.Name(), ".db-") {
			continue // run-time files of a local `serve`
		}
		if !strings.Contains(string(readme), e.Name()) {
			t.Errorf("examples/README.md does not mention %s", e.Name())
		}
	}
}

// TestExampleCertificate: the committed example pair loads, covers the
// names the L7 example uses, is its own trust anchor (so `curl --cacert`
// works as documented) and stays valid for years.
func TestExampleCertificate(t *testing.T) {
	certFile := filepath.Join(examplesDir, "certs", "app.pem")
	if _, err := tls.LoadX509KeyPair(certFile, filepath.Join(examplesDir, "certs", "app-key.pem")); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatal("no PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	for _, name := range []string{"app.localhost", "v1.app.localhost", "localhost"} {
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, CurrentTime: time.Now().AddDate(2, 0, 0)}); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// runExample copies an example config into a temporary directory with
// every 127.0.0.1:PORT replaced — by the address in backends if given,
// else by a free port — copies examples/certs next to it, and starts
// the daemon on it. It returns the daemon and the address mapping.
func runExample(t *testing.T, name string, backends map[string]string) (*daemon, map[string]string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(examplesDir, name))
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t)
	addrs := map[string]string{}
	content := regexp.MustCompile(`127\.0\.0\.1:\d+`).ReplaceAllStringFunc(string(data), func(a string) string {
		if _, ok := addrs[a]; !ok {
			if b, ok := backends[a]; ok {
				addrs[a] = b
			} else {
				addrs[a] = freeAddr(t)
			}
		}
		return addrs[a]
	})
	if err := os.CopyFS(filepath.Join(dir, "certs"), os.DirFS(filepath.Join(examplesDir, "certs"))); err != nil {
		t.Fatal(err)
	}
	base := strings.TrimSuffix(name, ".toml")
	env := &testEnv{
		dir:    dir,
		config: filepath.Join(dir, name),
		sock:   filepath.Join(dir, base+".sock"),
		db:     filepath.Join(dir, base+".db"),
	}
	if !strings.Contains(content, fmt.Sprintf("unix_socket = %q", base+".sock")) {
		t.Fatalf("%s: expected unix_socket = %q", name, base+".sock")
	}
	writeFile(t, env.config, content)
	return env.start(t), addrs
}

// TestExampleL7 runs examples/l7.toml: HTTPS with the committed example
// certificate, HTTP/2 to an h2c backend on one route and HTTP/1.1 on the
// other, L4 passthrough for the rest.
func TestExampleL7(t *testing.T) {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	backend := &http.Server{
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s", r.Proto, r.Host)
		}),
	}
	served := make(chan struct{})
	go func() { defer close(served); backend.Serve(ln) }()
	t.Cleanup(func() { backend.Close(); <-served })
	passthrough := testnet.NamedBackend(t, "passthrough")

	d, addrs := runExample(t, "l7.toml", map[string]string{
		"127.0.0.1:9003": ln.Addr().String(),
		"127.0.0.1:9001": passthrough,
	})
	proxyAddr := addrs["127.0.0.1:8444"]

	pem, err := os.ReadFile(filepath.Join(examplesDir, "certs", "app.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, proxyAddr)
		},
	}
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	defer tr.CloseIdleConnections()
	for _, tc := range []struct{ url, want string }{
		{"https://app.localhost/", "HTTP/2.0 app.localhost"},       // h2c backend
		{"https://v1.app.localhost/", "HTTP/1.1 v1.app.localhost"}, // http1 backend
	} {
		resp, err := client.Get(tc.url)
		if err != nil {
			t.Fatalf("GET %s: %v", tc.url, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/2.0" || string(body) != tc.want {
			t.Errorf("GET %s: %s %s %q; want 200 over HTTP/2.0 with %q", tc.url, resp.Proto, resp.Status, body, tc.want)
		}
	}
	if got, err := testnet.Ask(proxyAddr, testnet.ClientHello(t, &tls.Config{ServerName: "other.localhost"})); err != nil || got != "passthrough" {
		t.Errorf("other.localhost: %q, %v; want the L4 default route", got, err)
	}
	tr.CloseIdleConnections()
	d.stop(t)
}

// TestExampleProxyChain runs examples/proxy-chain.toml: the inner
// listener sees the real client address the edge sent in PROXY v2.
func TestExampleProxyChain(t *testing.T) {
	app := testnet.NamedBackend(t, "app")
	d, addrs := runExample(t, "proxy-chain.toml", map[string]string{"127.0.0.1:9001": app})
	edge := addrs["127.0.0.1:8445"]

	c, err := net.DialTimeout("tcp", edge, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(testnet.ClientHello(t, &tls.Config{ServerName: "app.localhost"})); err != nil {
		t.Fatal(err)
	}
	if got, err := testnet.ReadLine(c); err != nil || got != "app" {
		t.Fatalf("through the chain: %q, %v", got, err)
	}
	c.Close()
	d.waitLog(t, 1, "msg=connection", "listener=inner", "client="+c.LocalAddr().String()+" ")
	d.stop(t)
}

// TestGrafanaDashboard: the dashboard is JSON and uses only metric names
// and label names a running daemon exports.
func TestGrafanaDashboard(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(examplesDir, "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	var queries []string // PromQL: panel targets and template variable queries
	var ids []float64
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "expr" || k == "definition") {
					queries = append(queries, s)
				}
			}
			if q, ok := v["query"].(map[string]any); ok {
				if s, ok := q["query"].(string); ok {
					queries = append(queries, s)
				}
			}
			if id, ok := v["id"].(float64); ok {
				ids = append(ids, id)
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(dash)
	if len(queries) < 10 {
		t.Fatalf("found only %d queries in the dashboard", len(queries))
	}
	seen := map[float64]bool{}
	for _, id := range ids {
		if seen[id] {
			t.Errorf("panel id %v used twice", id)
		}
		seen[id] = true
	}

	env, d, _ := startMetricsDaemon(t)
	e := parseExposition(scrape(t, env.metrics))
	d.stop(t)
	series := e.seriesNames()
	metricName := regexp.MustCompile(`portcullis_[a-z0-9_]+`)

	// Anywhere in the file (descriptions too): a family or series name.
	for _, name := range metricName.FindAllString(string(data), -1) {
		if e.types[name] == "" && !series[name] {
			t.Errorf("dashboard mentions %s, which the daemon does not export", name)
		}
	}
	// In queries: a series name (histogram_quantile needs _bucket).
	used := map[string]bool{}
	for _, q := range queries {
		for _, name := range metricName.FindAllString(q, -1) {
			used[name] = true
			if !series[name] {
				t.Errorf("query uses %s, which is not an exported series: %s", name, q)
			}
		}
	}
	for _, name := range []string{
		"portcullis_connections_active", "portcullis_connections_accepted_total",
		"portcullis_connections_rejected_total", "portcullis_route_bytes_total",
		"portcullis_backend_dial_duration_seconds_bucket", "portcullis_l7_requests_total",
		"portcullis_l7_request_duration_seconds_bucket", "portcullis_config_reloads_total",
		"portcullis_config_last_reload_successful", "portcullis_relay_pipe_unavailable_total",
	} {
		if !used[name] {
			t.Errorf("the dashboard has no panel querying %s", name)
		}
	}

	// Label names in selectors, by/without clauses and label_values().
	labels := map[string]bool{"instance": true, "job": true} // added by Prometheus at scrape
	for l := range e.labels {
		labels[l] = true
	}
	matcher := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"`)
	grouping := regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	labelValues := regexp.MustCompile(`label_values\(.*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)`)
	for _, q := range queries {
		var names []string
		for _, m := range matcher.FindAllStringSubmatch(q, -1) {
			names = append(names, m[1])
		}
		for _, m := range grouping.FindAllStringSubmatch(q, -1) {
			for _, n := range strings.Split(m[1], ",") {
				names = append(names, strings.TrimSpace(n))
			}
		}
		for _, m := range labelValues.FindAllStringSubmatch(q, -1) {
			names = append(names, m[1])
		}
		for _, n := range names {
			if !labels[n] {
				t.Errorf("query uses label %q, which no portcullis metric has: %s", n, q)
			}
		}
	}
}
