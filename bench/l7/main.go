// Command l7 is the load benchmark for L7 routes: h2load (Debian's
// nghttp2-client) drives 32 connections × 10 concurrent streams of a
// small request, once straight at an h2c backend and once through a
// portcullis L7 route (TLS terminated by portcullis, h2c to the same
// backend), and reports requests/s and the ratio to direct.
//
//	go run ./bench/l7 -duration 5s -rounds 4
//
// Loopback only; it starts the backend in process and portcullis as a
// child process, and stops both when done.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

func main() {
	duration := flag.Duration("duration", 5*time.Second, "measured time per round and target")
	rounds := flag.Int("rounds", 4, "rounds per target, alternating direct and proxied")
	conns := flag.Int("c", 32, "connections")
	streams := flag.Int("m", 10, "concurrent streams per connection")
	profile := flag.String("cpuprofile", "", "write a CPU profile of the proxy during the proxied run to this file")
	allocProfile := flag.String("allocprofile", "", "write a profile of the proxy's allocations during the proxied run to this file")
	procs := flag.Int("proxy-procs", 0, "run portcullis with GOMAXPROCS set to this (0: the runtime's default)")
	flag.Parse()
	if _, err := exec.LookPath("h2load"); err != nil {
		log.Fatal("h2load not found: apt-get install nghttp2-client")
	}
	dir, err := os.MkdirTemp("", "portcullis-l7bench")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	backend := startBackend()
	certFile, keyFile := writeCert(dir)
	port, metricsPort := freePort(), freePort()
	cfg := filepath.Join(dir, "bench.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
[state]
database = "bench.db"

[metrics]
listen = "127.0.0.1:%d"

[[listener]]
name = "bench"
listen = "127.0.0.1:%d"
idle_timeout = "1m"

  [[listener.route]]
  sni = "web.test"
  mode = "l7"
  backend = %q
  tls_cert = %q
  tls_key = %q
`, metricsPort, port, backend, certFile, keyFile)), 0o600)

	bin := filepath.Join(dir, "portcullis")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		log.Fatalf("building portcullis: %v\n%s", err, out)
	}
	px := exec.Command(bin, "serve", "-config", cfg, "-log-level", "error", "-pprof")
	px.Stderr = os.Stderr
	if *procs > 0 {
		px.Env = append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(*procs))
	}
	if err := px.Start(); err != nil {
		log.Fatal(err)
	}
	defer func() { px.Process.Kill(); px.Wait() }()
	waitPort(port)

	fmt.Printf("L7 load: h2load -c %d -m %d, %d rounds of %s per target, alternating; client, proxy and backend share this machine's %d CPUs\n\n",
		*conns, *streams, *rounds, *duration, runtime.NumCPU())
	secs := strconv.Itoa(int(duration.Seconds()))
	common := []string{"-c", strconv.Itoa(*conns), "-m", strconv.Itoa(*streams), "-t", "1", "-D", secs, "--warm-up-time=1"}
	// Alternating short rounds spread the machine's own noise (the load
	// average, a GC in the backend) over both targets instead of letting
	// it land on one.
	var direct, proxied []float64
	for i := range *rounds {
		direct = append(direct, h2load(append(common, "http://"+backend+"/")...))
		if i == 0 && *profile != "" {
			go fetchProfile(metricsPort, "profile", *duration/2, *profile)
		}
		if i == 0 && *allocProfile != "" {
			go fetchProfile(metricsPort, "allocs", *duration/2, *allocProfile)
		}
		proxied = append(proxied, h2load(append(common, fmt.Sprintf("--connect-to=127.0.0.1:%d", port), fmt.Sprintf("https://web.test:%d/", port))...))
	}
	fmt.Printf("%-28s %12s   %s\n", "", "requests/s", "rounds")
	fmt.Printf("%-28s %12.0f   %s\n", "direct (h2c backend)", mean(direct), list(direct, "%.0f"))
	ratios := make([]float64, len(direct))
	for i := range direct {
		ratios[i] = proxied[i] / direct[i]
	}
	fmt.Printf("%-28s %12.0f   %s\n", "portcullis L7 (h2 → h2c)", mean(proxied), list(proxied, "%.0f"))
	fmt.Printf("%-28s %11.2fx   %s\n", "ratio to direct", mean(proxied)/mean(direct), list(ratios, "%.2fx"))
}

func mean(v []float64) float64 {
	sum := 0.0
	for _, x := range v {
		sum += x
	}
	return sum / float64(len(v))
}

func list(v []float64, format string) string {
	s := ""
	for i, x := range v {
		if i > 0 {
			s += " "
		}
		s += fmt.Sprintf(format, x)
	}
	return s
}

var finished = regexp.MustCompile(`finished in [^,]+, ([0-9.]+) req/s`)

func h2load(args ...string) float64 {
	out, err := exec.Command("h2load", args...).CombinedOutput()
	m := finished.FindSubmatch(out)
	if err != nil || m == nil {
		log.Fatalf("h2load %v: %v\n%s", args, err, out)
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

func startBackend() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	body := []byte("ok\n")
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
	go (&http.Server{Handler: h2c.NewHandler(h, &http2.Server{MaxConcurrentStreams: 250})}).Serve(ln)
	return ln.Addr().String()
}

func writeCert(dir string) (string, string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "web.test"}, DNSNames: []string{"web.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		log.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile := filepath.Join(dir, "web.pem"), filepath.Join(dir, "web-key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return certFile, keyFile
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func waitPort(port int) {
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	log.Fatal("portcullis did not start")
}

// fetchProfile saves a profile (kind: "profile" for CPU, "allocs") of the
// proxy taken while h2load runs.
func fetchProfile(port int, kind string, d time.Duration, path string) {
	time.Sleep(2 * time.Second) // past the warm-up
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/%s?seconds=%d", port, kind, int(d.Seconds())))
	if err != nil {
		log.Printf("profile: %v", err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		log.Printf("profile: %v", err)
		return
	}
	defer f.Close()
	io.Copy(f, resp.Body)
}
