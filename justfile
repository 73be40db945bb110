# Every recipe is a plain command that also works without `just`.

# Build the portcullis binary.
build:
    go build -o portcullis .

# The README's test command (what CI runs).
test:
    go vet ./...
    go test -race ./...

# Hot-path micro-benchmarks (ClientHello parser, route lookup, L4 connection and bulk relay, firewall, PROXY parser, reload, L7 relay headers).
bench:
    go test -run XXX -bench . -benchmem ./clienthello/ ./proxy/ ./firewall/ ./proxyproto/ ./reload/ ./l7/

# Whole-proxy load benchmark against a direct connection (loopback only, bounded in time).
loadbench:
    go run ./bench -duration 5s

# The same with the proxies on CPUs of their own (half the machine each way).
loadbench-split:
    go run ./bench -duration 5s -cpus split

# L7 load benchmark: h2load through an L7 route vs the h2c backend directly (needs nghttp2-client).
loadbench-l7:
    go run ./bench/l7 -duration 5s -rounds 4

# Run every fuzz target for a bounded time.
fuzz seconds="30":
    go test -run XXX -fuzz FuzzReadV1 -fuzztime {{seconds}}s ./proxyproto/
    go test -run XXX -fuzz FuzzReadV2 -fuzztime {{seconds}}s ./proxyproto/
    go test -run XXX -fuzz FuzzReadClientHello -fuzztime {{seconds}}s ./clienthello/

# Format and lint.
fmt:
    gofmt -w .
    go vet ./...

# Regenerate the admin API's gRPC code (needs protoc from Debian's protobuf-compiler).
proto:
    go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
    go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1
    protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative rpc/adminpb/admin.proto
