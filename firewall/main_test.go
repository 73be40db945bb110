package firewall

import (
	"testing"

	"go.uber.org/goleak"
)

// The package starts no goroutines; the concurrency tests start some and
// must end every one of them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
