package rpc_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/portcullis/portcullis/rpc/adminpb"
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
	if got := overrideSet(h.dbOverrides()); !slices.Equal(got, dbBefore) {
		t.Errorf("the failed PutRoute changed the database: %v, was %v", got, dbBefore)
	}

	// The next start must not apply the change the caller was told failed.
	h.restart()
	if _, ok := h.routes()["public/late.test"]; ok {
		t.Errorf("after a restart, the route whose PutRoute failed is served")
	}
}
