// Command h2c-backend is a plaintext HTTP server for trying the L7
// example (examples/l7.toml): portcullis terminates TLS and speaks h2c
// (HTTP/2 without TLS, the default backend_protocol) or HTTP/1.1 to it.
//
//	go run ./examples/h2c-backend -listen 127.0.0.1:9003
//
// Each response shows what the proxy forwarded: the protocol it used
// to the backend and the forwarding headers it set.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9003", "address to serve plaintext HTTP/1.1 and h2c on")
	name := flag.String("name", "l7-app", "name to report in responses")
	flag.Parse()

	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true) // h2c with prior knowledge, as portcullis sends it
	srv := &http.Server{
		Addr:              *listen,
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello from backend %q: proto=%s host=%s path=%s x-forwarded-for=%q x-forwarded-proto=%q\n",
				*name, r.Proto, r.Host, r.URL.Path, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Proto"))
		}),
	}
	log.Printf("h2c backend %q serving plaintext HTTP/1.1 and h2c on %s", *name, *listen)
	log.Fatal(srv.ListenAndServe())
}
