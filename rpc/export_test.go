package rpc

import (
	"testing"
	"time"
)

// SetStopGrace shortens how long Running.Stop waits for calls in flight,
// for the test's duration.
func SetStopGrace(t *testing.T, d time.Duration) {
	old := stopGrace
	stopGrace = d
	t.Cleanup(func() { stopGrace = old })
}
