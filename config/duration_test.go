package config

import (
	"errors"
	"maps"
	"strings"
	"testing"
	"time"
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

// TestDurationZeroRefused: a duration written as zero would decode like
// a key left out and silently get the default ("0s" grace meaning 30s,
// "0s" idle timeout ten minutes), so it is an error at its line; any
// other positive duration is taken as written.
func TestDurationZeroRefused(t *testing.T) {
	base := "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n"
	for _, tc := range []struct{ name, toml, want string }{
		{"shutdown_grace", "shutdown_grace = \"0s\"\n" + base, "p.toml:1: shutdown_grace: \"0s\": must be more than zero"},
		{"idle_timeout", base + "idle_timeout = \"0m\"\n", "p.toml:4: listener[0].idle_timeout: \"0m\": must be more than zero"},
		{"handshake_timeout", base + "handshake_timeout = \"0\"\n", "p.toml:4: listener[0].handshake_timeout: "},
		{"dial_timeout", base + "dial_timeout = \"0ms\"\n", "p.toml:4: listener[0].dial_timeout: "},
		{"window", "[firewall]\nrate_limit = { connections = 5, window = \"0s\" }\n" + base, "p.toml:2: firewall.rate_limit.window: "},
		{"response_timeout", base + "[[listener.route]]\nsni = \"x.test\"\nbackend = \"b:1\"\nmode = \"l7\"\ntls_cert = \"c\"\ntls_key = \"k\"\nresponse_timeout = \"0h\"\n", "p.toml:10: listener[0].route[0].response_timeout: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("p.toml", []byte(tc.toml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v\ndoes not contain %q", err, tc.want)
			}
		})
	}
	c, err := Parse("p.toml", []byte("shutdown_grace = \"1ms\"\n"+base+"idle_timeout = \"0.5s\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.ShutdownGrace.D() != time.Millisecond || c.Listeners[0].IdleTimeout.D() != 500*time.Millisecond {
		t.Errorf("grace %v, idle %v; want 1ms and 500ms as written", c.ShutdownGrace.D(), c.Listeners[0].IdleTimeout.D())
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

// TestDurationErrorDoesNotHideValidation: a duration written as a number
// or as zero is reported together with the file's other problems, as the
// README promises ("Validation errors are all printed at once"), and not
// a second time by the validation of the value it decoded to.
func TestDurationErrorDoesNotHideValidation(t *testing.T) {
	doc := "shutdown_grace = \"0s\"\n[firewall]\nrate_limit = { connections = 5, window = \"0s\" }\n" +
		"[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nidle_timeout = -5\nmax_connections = -1\nmax_conections = 1\n"
	_, err := Parse("p.toml", []byte(doc))
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{
		"p.toml:1: shutdown_grace: \"0s\": must be more than zero",
		"p.toml:3: firewall.rate_limit.window: \"0s\": must be more than zero",
		"p.toml:7: listener[0].idle_timeout: must be a duration string",
		"p.toml:8: listener[0].max_connections: must not be negative",
		"p.toml:9: listener.max_conections: unknown key",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if n := strings.Count(err.Error(), "\n") + 1; n != 5 {
		t.Errorf("%d problems reported, want 5 (one per key):\n%v", n, err)
	}
	// A duration the decoder cannot store at all (a float) still gets the
	// duration message, not the decoder's.
	_, err = Parse("p.toml", []byte("shutdown_grace = 1.5\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n"))
	if err == nil || err.Error() != "p.toml:1: shutdown_grace: must be a duration string such as \"5s\" or \"10m\", not float" {
		t.Errorf("float duration: %v", err)
	}
}
