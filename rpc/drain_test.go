package rpc_test

import (
	"context"
	"io"
	"slices"
	"testing"
	"time"

	"github.com/portcullis/portcullis/rpc"
	"github.com/portcullis/portcullis/rpc/adminpb"
	"github.com/portcullis/portcullis/testnet"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
)

// TestMutationDuringDrainChangesNothing: serve.go stops the proxy first
// and keeps the admin API up while connections drain. A mutation made
// then is refused, and — as DESIGN.md promises for a failed mutation —
// leaves the database as it was, so it does not resurface at the next
// start after the caller was told it failed.
func TestMutationDuringDrainChangesNothing(t *testing.T) {
	h := newHarness(t, fileConfig{})
	dbBefore := overrideSet(h.dbOverrides())

	// SIGTERM: the proxy drains, the admin API stays up (serve.go).
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.px.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	_, err := h.cli.PutRoute(h.ctx(), &adminpb.Route{Listener: "public", Sni: "late.test", Backend: h.backends["new"]})
	if err == nil {
		t.Fatal("PutRoute during shutdown succeeded, want an error")
	}
	t.Logf("PutRoute during shutdown: %v", err)
	// Unavailable, the code for a server going away (a client may retry
	// against its successor), not Internal, which says the daemon is
	// broken.
	wantCode(t, err, codes.Unavailable)
	_, err = h.cli.Reload(h.ctx())
	wantCode(t, err, codes.Unavailable)
	if got := overrideSet(h.dbOverrides()); !slices.Equal(got, dbBefore) {
		t.Errorf("the failed PutRoute changed the database: %v, was %v", got, dbBefore)
	}

	// The next start must not apply the change the caller was told failed.
	h.restart()
	if _, ok := h.routes()["public/late.test"]; ok {
		t.Errorf("after a restart, the route whose PutRoute failed is served")
	}
}

// TestStopCutsStalledSnapshot: a client that opens a Snapshot stream and
// never reads it (a suspended ctl) blocks the call in flow control. The
// daemon's exit must not wait for it forever: Running.Stop lets calls
// finish for its grace period, then cancels them.
func TestStopCutsStalledSnapshot(t *testing.T) {
	rpc.SetStopGrace(t, 200*time.Millisecond)
	h := newHarness(t, fileConfig{})
	h.fillRoutes(4000) // a database far larger than one flow-control window

	// Fixed 64 KiB windows: no window growth while the client reads nothing.
	conn, err := grpc.NewClient("unix:"+h.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := adminpb.NewAdminClient(conn).Snapshot(ctx, &adminpb.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// The first chunk proves the call is running; the client then stops
	// reading.
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}

	stopped := make(chan struct{})
	go func() { h.run.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(time.Minute): // a hang detector, far above the grace
		t.Fatal("Running.Stop still waiting for the stalled Snapshot call after a minute")
	}
	// The stream was cut, not completed.
	for {
		if _, err := stream.Recv(); err != nil {
			if err == io.EOF {
				t.Fatal("the stalled Snapshot stream completed; want it cancelled")
			}
			break
		}
	}
}

// TestStatusDuringDrain: serve.go keeps the admin API up while
// connections drain "so operators can watch the drain". GetStatus must
// then still list the listeners with the connections they have left.
func TestStatusDuringDrain(t *testing.T) {
	h := newHarness(t, fileConfig{})
	c, line, err := h.holdConn("public", "app.test")
	if err != nil || line != "app" {
		t.Fatalf("held connection: %q, %v", line, err)
	}
	defer c.Close()
	addr := h.addr("public")

	// SIGTERM: the proxy stops accepting and waits for c.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- h.px.Shutdown(ctx) }()
	// A reload is refused once the shutdown has begun. (A probe
	// connection would be one more to drain.)
	testnet.WaitFor(t, "the shutdown to begin", func() bool {
		_, err := h.cli.Reload(h.ctx())
		return err != nil
	})

	st := h.status("public")
	if st.ActiveConnections != 1 || st.Address != addr {
		t.Errorf("during the drain: public active %d, address %s; want 1, %s", st.ActiveConnections, st.Address, addr)
	}
	c.Close()
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
}
