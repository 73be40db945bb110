package state

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// helperEnv, when set, turns the test binary into the process that
// TestDurabilityAfterKill kills (see TestMain). Its value is the database.
const helperEnv = "PORTCULLIS_STATE_DURABILITY_DB"

// durabilityHelper writes overrides in a loop and prints each index once
// its Puts have returned: from then on the write is acknowledged, and the
// parent holds us to it.
func durabilityHelper(path string) int {
	s, err := Open(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// Bounded, so an orphaned helper (parent gone) stops on its own.
	deadline := time.Now().Add(2 * time.Minute)
	for i := 0; time.Now().Before(deadline); i++ {
		if err := put(context.Background(), s, i); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		// One write(2) per line, unbuffered: what the parent reads was
		// printed after the commit.
		if _, err := os.Stdout.WriteString(strconv.Itoa(i) + "\n"); err != nil {
			return 1
		}
	}
	s.Close()
	return 0
}

func TestDurabilityAfterKill(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns a subprocess")
	}
	path := filepath.Join(t.TempDir(), "state.db")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+path)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}

	// Kill after a few hundred acknowledged writes, while the helper is
	// busy writing the next; keep reading afterwards, since lines already
	// in the pipe were acknowledged too.
	const killAfter = 300
	var acked []int
	r := bufio.NewReader(stdout)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			// A line cut short by the kill has no newline and was never
			// complete: not acknowledged.
			if !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			break
		}
		i, err := strconv.Atoi(strings.TrimSpace(line))
		if err != nil {
			t.Fatalf("helper printed %q", line)
		}
		acked = append(acked, i)
		if len(acked) == killAfter {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("helper did not die of SIGKILL: %v\nstderr: %s", err, stderr.String())
	}
	if len(acked) < killAfter {
		t.Fatalf("helper acknowledged only %d writes\nstderr: %s", len(acked), stderr.String())
	}

	// The file as the killed process left it (hot WAL and all).
	db := rawDB(t, path)
	var integrity string
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&integrity); err != nil {
		t.Fatal(err)
	}
	if integrity != "ok" {
		t.Errorf("integrity_check: %s", integrity)
	}
	db.Close()

	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	o, err := s.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	routes := map[string]bool{}
	for _, r := range o.Routes {
		routes[r.SNI] = true
	}
	listeners := map[string]int{}
	for _, l := range o.Listeners {
		listeners[l.Listener] = l.MaxConnections
	}
	firewall := map[string]bool{}
	for _, f := range o.Firewall {
		firewall[f.Value] = true
	}
	missing := 0
	for _, i := range acked {
		k := fmt.Sprintf("k%d", i)
		ip := fmt.Sprintf("10.%d.%d.%d/32", i>>16&0xff, i>>8&0xff, i&0xff)
		if n, ok := listeners["l-"+k]; !routes[k+".example.com"] || !firewall[ip] || !ok || n != i {
			missing++
			if missing <= 5 {
				t.Errorf("acknowledged write %d lost", i)
			}
		}
	}
	if missing > 0 {
		t.Errorf("%d of %d acknowledged writes lost", missing, len(acked))
	}
	t.Logf("%d acknowledged writes before SIGKILL, %d routes on disk", len(acked), len(o.Routes))
}
