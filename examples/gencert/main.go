// Command gencert writes the self-signed certificate and key the L7
// example (examples/l7.toml) terminates TLS with. They are committed
// under examples/certs so the example runs as checked out; they are for
// trying portcullis on one machine only — the private key is public.
//
//	go run ./examples/gencert -out examples/certs
//
// The certificate covers app.localhost, *.app.localhost, localhost and
// 127.0.0.1, and is its own trust anchor:
//
//	curl --cacert examples/certs/app.pem --resolve app.localhost:8444:127.0.0.1 https://app.localhost:8444/
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
	"log"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

func main() {
	out := flag.String("out", "examples/certs", "directory to write app.pem and app-key.pem into")
	years := flag.Int("years", 20, "validity in years (long: the pair is committed)")
	flag.Parse()
	if err := write(*out, *years); err != nil {
		log.Fatal(err)
	}
}

func write(dir string, years int) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return err
	}
	now := time.Now().UTC().Truncate(24 * time.Hour)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "app.localhost", Organization: []string{"portcullis example (not secret, do not deploy)"}},
		DNSNames:     []string{"app.localhost", "*.app.localhost", "localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    now.Add(-24 * time.Hour),
		NotAfter:     now.AddDate(years, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		// Self-signed and usable as its own CA, so clients can trust it
		// with --cacert instead of turning verification off.
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	files := []struct {
		name, typ string
		der       []byte
		mode      os.FileMode
	}{
		{"app.pem", "CERTIFICATE", der, 0o644},
		{"app-key.pem", "PRIVATE KEY", keyDER, 0o600},
	}
	for _, f := range files {
		path := filepath.Join(dir, f.name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: f.typ, Bytes: f.der}), f.mode); err != nil {
			return err
		}
		fmt.Println("wrote", path)
	}
	return nil
}
