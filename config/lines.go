package config

import (
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// lineTable maps a key path in our error notation
// ("listener[0].route[1].sni", "firewall.block[2]") to the line it was
// written on. go-toml reports positions only for decoding errors, so
// validation walks the same document once more to learn where each key is.
type lineTable map[string]int

func (t lineTable) line(key string) int { return t[key] }

func indexLines(data []byte) lineTable {
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
			indexValue(t, key, e.Value(), lineOf(first), lineOf)
		}
	}
	return t
}

func indexValue(t lineTable, key string, v *unstable.Node, line int, lineOf func(uint32) int) {
	if _, seen := t[key]; !seen {
		t[key] = line
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
			indexValue(t, key+"["+strconv.Itoa(i)+"]", n, l, lineOf)
		}
	case unstable.InlineTable:
		it := v.Children()
		for it.Next() {
			kv := it.Node()
			parts, first := keyParts(kv)
			indexValue(t, key+"."+strings.Join(parts, "."), kv.Value(), lineOf(first), lineOf)
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
