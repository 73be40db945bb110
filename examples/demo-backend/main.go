// Command demo-backend is a tiny HTTPS server for trying portcullis on
// one machine. It makes a self-signed certificate for the names it is
// given at start, so it needs no files:
//
//	go run ./examples/demo-backend -listen 127.0.0.1:9001 -name app
//
// Every response says which backend answered and which SNI the client
// asked for, so routing is visible with curl; /bytes/N answers with N
// bytes, for trying a bulk transfer.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net/http"
	"strconv"
	"strings"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9001", "address to serve HTTPS on")
	name := flag.String("name", "app", "name to report in responses")
	hosts := flag.String("hosts", "localhost,*.localhost", "comma-separated names for the self-signed certificate")
	flag.Parse()

	cert, err := selfSigned(strings.Split(*hosts, ","))
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{
		Addr:              *listen,
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// /bytes/N sends N bytes, for trying a bulk transfer.
			if n, err := strconv.ParseInt(strings.TrimPrefix(r.URL.Path, "/bytes/"), 10, 64); err == nil && n >= 0 {
				w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
				io.CopyN(w, zeros{}, n)
				return
			}
			fmt.Fprintf(w, "hello from backend %q: sni=%q proto=%s path=%s\n", *name, r.TLS.ServerName, r.Proto, r.URL.Path)
		}),
	}
	log.Printf("demo backend %q serving HTTPS on %s", *name, *listen)
	log.Fatal(srv.ListenAndServeTLS("", ""))
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func selfSigned(hosts []string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: hosts[0]},
		DNSNames:     hosts,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
