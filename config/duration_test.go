package config

import (
	"errors"
	"maps"
	"strings"
	"testing"
)

// TestDurationMustBeAString: `idle_timeout = 600` is a wrong type (the
// schema wants "10m"); it must be an error naming file:line:key, not a
// silent 600ns timeout that cuts every connection.
func TestDurationMustBeAString(t *testing.T) {
	base := "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n"
	for _, tc := range []struct{ name, toml, want string }{
		{"integer idle_timeout", base + "idle_timeout = 600\n", "p.toml:4: listener[0].idle_timeout: "},
		{"integer handshake_timeout", base + "handshake_timeout = 5\n", "p.toml:4: listener[0].handshake_timeout: "},
		{"integer shutdown_grace", "shutdown_grace = 30\n" + base, "p.toml:1: shutdown_grace: "},
		{"integer window", "[firewall]\nrate_limit = { connections = 5, window = 10 }\n" + base, "p.toml:2: firewall.rate_limit.window: "},
		{"float shutdown_grace", "shutdown_grace = 1.5\n" + base, "p.toml:1: shutdown_grace: "},
		{"integer response_timeout", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"b:1\"\nmode = \"l7\"\ntls_cert = \"c\"\ntls_key = \"k\"\nresponse_timeout = 30\n", "p.toml:10: listener[0].route[0].response_timeout: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("p.toml", []byte(tc.toml))
			if err == nil {
				t.Fatalf("accepted; durations: grace %v, listener %+v", c.ShutdownGrace.D(), c.Listeners[0])
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q\ndoes not contain %q", err, tc.want)
			}
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %T is not a *config.Error", err)
			}
		})
	}
}

// TestDurationKeys: the keys checked for a duration string are exactly
// the schema's Duration fields.
func TestDurationKeys(t *testing.T) {
	want := map[string]bool{
		"shutdown_grace":                  true,
		"firewall.rate_limit.window":      true,
		"listener.handshake_timeout":      true,
		"listener.idle_timeout":           true,
		"listener.dial_timeout":           true,
		"listener.route.response_timeout": true,
	}
	if !maps.Equal(durationKeys, want) {
		t.Errorf("durationKeys = %v, want %v", durationKeys, want)
	}
}
