package config

import (
	"strings"
	"testing"
)

// TestDuplicateWildcardListen: ":8443", "[::]:8443" and "0.0.0.0:8443"
// all bind the same wildcard socket (the second bind fails with "address
// already in use"), so `check` must report them as duplicates.
func TestDuplicateWildcardListen(t *testing.T) {
	for _, pair := range [][2]string{{":8443", "[::]:8443"}, {":8443", "0.0.0.0:8443"}, {"[::]:8443", "0.0.0.0:8443"}, {":8443", "[::ffff:0.0.0.0]:8443"}} {
		doc := "[[listener]]\nname = \"a\"\nlisten = \"" + pair[0] + "\"\n[[listener]]\nname = \"b\"\nlisten = \"" + pair[1] + "\"\n"
		_, err := Parse("p.toml", []byte(doc))
		want := "p.toml:6: listener[1].listen: duplicate listen address"
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q and %q: error %v, want %q", pair[0], pair[1], err, want)
		}
	}
}
