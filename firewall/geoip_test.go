package firewall

import (
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/maxmind/mmdbwriter"
	"github.com/maxmind/mmdbwriter/mmdbtype"
)

// testNetworks is the content of the test database, in the GeoLite2
// Country layout. The networks are real allocations (mmdbwriter refuses
// reserved ones) but the countries are made up where convenient.
var testNetworks = []struct {
	cidr       string
	country    string // country.iso_code, "" for none
	registered string // registered_country.iso_code, "" for none
}{
	{"81.2.69.0/24", "KP", "GB"},
	{"175.45.176.0/22", "KP", "KP"},
	{"2a0b:f4c0::/32", "KP", "KP"},
	{"8.8.8.0/24", "US", "US"},
	{"2a01:4f8::/32", "DE", "DE"},
	{"89.160.20.0/24", "", "SE"}, // located nowhere: falls back to registered
	{"1.0.0.0/24", "X1", ""},     // not a valid code: reported as unknown
	{"2.16.0.0/16", "fr", "fr"},  // lower-case in the data: normalised
	{"185.0.0.0/16", "", ""},     // a record with no country at all
}

// writeTestDB writes the test database with mmdbwriter and returns its
// path in a fresh temporary directory.
func writeTestDB(t testing.TB) string {
	t.Helper()
	tree, err := mmdbwriter.New(mmdbwriter.Options{
		DatabaseType: "GeoLite2-Country",
		Description:  map[string]string{"en": "portcullis firewall test database"},
		RecordSize:   24,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range testNetworks {
		_, ipnet, err := net.ParseCIDR(n.cidr)
		if err != nil {
			t.Fatal(err)
		}
		rec := mmdbtype.Map{
			"continent": mmdbtype.Map{"code": mmdbtype.String("XX")},
		}
		if n.country != "" {
			rec["country"] = mmdbtype.Map{
				"iso_code":   mmdbtype.String(n.country),
				"geoname_id": mmdbtype.Uint32(1),
				"names":      mmdbtype.Map{"en": mmdbtype.String("Somewhere")},
			}
		}
		if n.registered != "" {
			rec["registered_country"] = mmdbtype.Map{"iso_code": mmdbtype.String(n.registered)}
		}
		if err := tree.Insert(ipnet, rec); err != nil {
			t.Fatalf("insert %s: %v", n.cidr, err)
		}
	}
	path := filepath.Join(t.TempDir(), "GeoLite2-Country.mmdb")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tree.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func openTestDB(t testing.TB) *GeoDB {
	t.Helper()
	g, err := OpenGeoDB(writeTestDB(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

func TestGeoDBCountry(t *testing.T) {
	g := openTestDB(t)
	tests := []struct {
		addr string
		want string
	}{
		{"81.2.69.1", "KP"},
		{"81.2.69.255", "KP"},
		{"::ffff:81.2.69.1", "KP"}, // mapped: looked up as IPv4
		{"175.45.179.9", "KP"},
		{"2a0b:f4c0:1:2::3", "KP"},
		{"8.8.8.8", "US"},
		{"2a01:4f8::1", "DE"},
		{"89.160.20.112", "SE"}, // registered country fallback
		{"2.16.1.1", "FR"},      // normalised to upper case
		{"1.0.0.1", ""},         // invalid code in the record
		{"185.0.1.1", ""},       // record without any country
		{"81.2.70.1", ""},       // not in the database
		{"2a0c::1", ""},         // not in the database
		{"10.0.0.1", ""},        // reserved, never in the database
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			a := netip.MustParseAddr(tt.addr)
			// Twice: the second answer comes from the record cache.
			for range 2 {
				if got := g.Country(a); got != tt.want {
					t.Fatalf("Country(%s) = %q, want %q", a, got, tt.want)
				}
			}
		})
	}
	t.Run("invalid address", func(t *testing.T) {
		if got := g.Country(netip.Addr{}); got != "" {
			t.Fatalf("Country(invalid) = %q", got)
		}
	})
	t.Run("nil", func(t *testing.T) {
		var g *GeoDB
		if got := g.Country(netip.MustParseAddr("81.2.69.1")); got != "" {
			t.Fatalf("nil GeoDB: Country = %q", got)
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

func TestGeoDBCountryAllocs(t *testing.T) {
	g := openTestDB(t)
	for _, s := range []string{"81.2.69.1", "2a01:4f8::1", "81.2.70.1"} {
		a := netip.MustParseAddr(s)
		g.Country(a) // warm the record cache
		if n := testing.AllocsPerRun(100, func() { g.Country(a) }); n != 0 {
			t.Errorf("Country(%s): %v allocs/op, want 0", a, n)
		}
	}
}

func TestOpenGeoDBErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	random := make([]byte, 64<<10)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	valid, err := os.ReadFile(writeTestDB(t))
	if err != nil {
		t.Fatal(err)
	}
	// A database whose search tree is overwritten: the metadata still
	// parses, so only verification notices.
	damaged := append([]byte(nil), valid...)
	for i := range 256 {
		damaged[i] = 0xff
	}

	tests := []struct {
		name string
		path string
		want string // substring of the error
	}{
		{"missing", filepath.Join(dir, "nope.mmdb"), "no such file"},
		{"directory", dir, "not a regular file (directory)"},
		{"empty", write("empty.mmdb", nil), "empty"},
		{"random bytes", write("random.mmdb", random), "invalid MaxMind DB"},
		{"truncated", write("truncated.mmdb", valid[:len(valid)/2]), "invalid MaxMind DB"},
		{"damaged tree", write("damaged.mmdb", damaged), "corrupt database"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := OpenGeoDB(tt.path)
			if err == nil {
				g.Close()
				t.Fatal("OpenGeoDB succeeded")
			}
			if !strings.HasPrefix(err.Error(), "firewall: geoip: ") {
				t.Errorf("error %q lacks the firewall: geoip: prefix", err)
			}
			if !strings.Contains(err.Error(), tt.path) {
				t.Errorf("error %q does not name the file", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
			t.Log(err)
		})
	}
}

func TestGeoDBClose(t *testing.T) {
	g, err := OpenGeoDB(writeTestDB(t))
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("81.2.69.1")

	// Lookups racing Close must neither fault nor race; they see either
	// the answer or "".
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 1000 {
				if c := g.Country(a); c != "KP" && c != "" {
					t.Errorf("Country = %q during Close", c)
					return
				}
			}
		})
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()

	if c := g.Country(a); c != "" {
		t.Errorf("Country after Close = %q, want \"\"", c)
	}
	if err := g.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestOpenGeoDBRefusesSpecialFiles: a FIFO without a writer as the
// database blocked the open for ever, and with it the reload that
// compiled the snapshot (under the reload manager's lock, so every
// later reload and admin call). It is refused at once, naming the path;
// a symlink to the database still opens.
func TestOpenGeoDBRefusesSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.mmdb")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ path, want string }{
		{fifo, fifo + ": not a regular file (named pipe)"},
		{"/dev/null", "/dev/null: not a regular file (device)"},
	} {
		done := make(chan error, 1)
		go func() {
			g, err := OpenGeoDB(tt.path)
			if err == nil {
				g.Close()
			}
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !strings.HasPrefix(err.Error(), "firewall: geoip: "+tt.want) {
				t.Errorf("OpenGeoDB(%s) = %v, want %q", tt.path, err, "firewall: geoip: "+tt.want)
			}
		case <-time.After(10 * time.Second):
			// Unblock the open so the goroutine ends with the test.
			if w, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				w.Close()
			}
			<-done
			t.Fatalf("OpenGeoDB(%s) still blocked after 10s", tt.path)
		}
	}

	link := filepath.Join(dir, "GeoLite2-Country.mmdb")
	if err := os.Symlink(writeTestDB(t), link); err != nil {
		t.Fatal(err)
	}
	g, err := OpenGeoDB(link)
	if err != nil {
		t.Fatalf("symlinked database: %v", err)
	}
	g.Close()
}
