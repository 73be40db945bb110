package config

import (
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2/unstable"
)

// lineTable maps a key path in our error notation
// ("listener[0].route[1].sni", "firewall.block[2]") to the line it was
// written on. go-toml reports positions only for decoding errors, so
// validation walks the same document once more to learn where each key is.
type lineTable map[string]int

func (t lineTable) line(key string) int { return t[key] }

// kindTable maps the same keys to the value written there: its TOML
// kind, and for a string its contents.
type kindTable map[string]written

type written struct {
	kind unstable.Kind
	str  string
}

func indexLines(data []byte) (lineTable, kindTable) {
	starts := []int{0}
	for i, b := range data {
		if b == '\n' {
			starts = append(starts, i+1)
		}
	}
	lineOf := func(off uint32) int {
		return sort.Search(len(starts), func(i int) bool { return starts[i] > int(off) })
	}

	t := lineTable{}
	kinds := kindTable{}
	arrays := map[string]int{} // concrete array-table path -> last index
	var table string           // concrete path of the current [table]

	// resolve turns dotted key parts into a concrete path, descending into
	// the last element of every array table on the way.
	resolve := func(base string, parts []string) string {
		p := base
		for _, k := range parts {
			if p != "" {
				p += "."
			}
			p += k
			if n, ok := arrays[p]; ok {
				p += "[" + strconv.Itoa(n) + "]"
			}
		}
		return p
	}

	var p unstable.Parser
	p.Reset(data)
	for p.NextExpression() {
		e := p.Expression()
		parts, first := keyParts(e)
		switch e.Kind {
		case unstable.Table:
			table = resolve("", parts)
			t[table] = lineOf(first)
		case unstable.ArrayTable:
			parent := resolve("", parts[:len(parts)-1])
			arr := parts[len(parts)-1]
			if parent != "" {
				arr = parent + "." + arr
			}
			n, ok := arrays[arr]
			if ok {
				n++
			}
			arrays[arr] = n
			// Children of an earlier element must not leak into this one.
			for k := range arrays {
				if strings.HasPrefix(k, arr+"[") {
					delete(arrays, k)
				}
			}
			table = arr + "[" + strconv.Itoa(n) + "]"
			t[table] = lineOf(first)
		case unstable.KeyValue:
			key := resolve(table, parts)
			indexValue(t, kinds, key, e.Value(), lineOf(first), lineOf)
		}
	}
	return t, kinds
}

func indexValue(t lineTable, kinds kindTable, key string, v *unstable.Node, line int, lineOf func(uint32) int) {
	if _, seen := t[key]; !seen {
		t[key] = line
		w := written{kind: v.Kind}
		if v.Kind == unstable.String {
			w.str = string(v.Data)
		}
		kinds[key] = w
	}
	switch v.Kind {
	case unstable.Array:
		it := v.Children()
		for i := 0; it.Next(); i++ {
			n := it.Node()
			l := line
			if n.Raw.Length > 0 {
				l = lineOf(n.Raw.Offset)
			}
			indexValue(t, kinds, key+"["+strconv.Itoa(i)+"]", n, l, lineOf)
		}
	case unstable.InlineTable:
		it := v.Children()
		for it.Next() {
			kv := it.Node()
			parts, first := keyParts(kv)
			indexValue(t, kinds, key+"."+strings.Join(parts, "."), kv.Value(), lineOf(first), lineOf)
		}
	}
}

func keyParts(e *unstable.Node) (parts []string, offset uint32) {
	it := e.Key()
	for it.Next() {
		n := it.Node()
		if parts == nil {
			offset = n.Raw.Offset
		}
		parts = append(parts, string(n.Data))
	}
	return parts, offset
}

// durationKeys are the schema's duration keys, array indexes left out
// ("listener.idle_timeout"), read off the Config type's toml tags so a
// new Duration field is covered without being listed here.
var durationKeys = func() map[string]bool {
	keys := map[string]bool{}
	durationType := reflect.TypeFor[Duration]()
	var walk func(t reflect.Type, prefix string)
	walk = func(t reflect.Type, prefix string) {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct {
			return
		}
		for f := range t.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "" || name == "-" {
				continue
			}
			if f.Type == durationType {
				keys[prefix+name] = true
				continue
			}
			walk(f.Type, prefix+name+".")
		}
	}
	walk(reflect.TypeFor[Config](), "")
	return keys
}()

// durationErrors reports duration keys written as something other than
// a string, and durations written as zero. The decoder would store a
// bare integer as nanoseconds (Duration is an int64), so
// `idle_timeout = 600` would mean 600ns. And a zero is what a key left
// out decodes to, which gets the default: `shutdown_grace = "0s"` would
// silently mean 30s and `idle_timeout = "0s"` ten minutes, not "no
// grace" or "never", so it is refused rather than reinterpreted.
// Strings that are not durations are left to the decoder, which names
// them.
func durationErrors(path string, lines lineTable, kinds kindTable) error {
	var errs []error
	for key, w := range kinds {
		if !durationKeys[stripIndexes(key)] {
			continue
		}
		var err error
		if w.kind != unstable.String {
			err = fmt.Errorf("must be a duration string such as \"5s\" or \"10m\", not %s", strings.ToLower(w.kind.String()))
		} else if d, perr := time.ParseDuration(w.str); perr == nil && d == 0 {
			err = fmt.Errorf("%q: must be more than zero; leave the key out for the default", w.str)
		}
		if err != nil {
			errs = append(errs, &Error{File: path, Line: lines.line(key), Key: key, Err: err})
		}
	}
	sort.Slice(errs, func(i, j int) bool {
		a, b := errs[i].(*Error), errs[j].(*Error)
		return a.Line < b.Line || a.Line == b.Line && a.Key < b.Key
	})
	return errors.Join(errs...)
}

// stripIndexes turns "listener[0].route[1].sni" into "listener.route.sni".
func stripIndexes(key string) string {
	var b strings.Builder
	skip := false
	for _, r := range key {
		switch {
		case r == '[':
			skip = true
		case r == ']':
			skip = false
		case !skip:
			b.WriteRune(r)
		}
	}
	return b.String()
}
