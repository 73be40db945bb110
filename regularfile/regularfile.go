// Package regularfile reads the files a configuration names —
// certificates, keys, CA bundles, the GeoIP database — refusing at once
// anything that is not a regular file.
//
// Opening a FIFO that has no writer blocks until one appears, and
// reading a device such as /dev/zero never ends; the callers load these
// files while holding the reload manager's lock (a reload, an admin
// call), so one such path would stall every later reload and admin call.
// O_NONBLOCK makes the open return at once, and the type is checked on
// the opened file. Symlinks to regular files (Kubernetes mounts secrets
// that way) are followed as usual.
package regularfile

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

// Read returns the contents of the regular file at path. A limit above
// zero refuses a file longer than limit bytes, without reading past it.
func Read(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		// open(2) of a Unix socket fails with ENXIO; say what it is.
		if fi, serr := os.Stat(path); serr == nil && !fi.Mode().IsRegular() {
			return nil, notRegular(path, fi.Mode())
		}
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, notRegular(path, fi.Mode())
	}
	if limit > 0 && fi.Size() > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	// Sized up front, as os.ReadFile does: a GeoIP database is megabytes.
	var r io.Reader = f
	if limit > 0 {
		r = io.LimitReader(f, limit+1)
	}
	var buf bytes.Buffer
	buf.Grow(int(fi.Size()) + bytes.MinRead)
	if _, err := buf.ReadFrom(r); err != nil {
		return nil, err
	}
	// The file may have grown since Stat.
	if limit > 0 && int64(buf.Len()) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return buf.Bytes(), nil
}

func notRegular(path string, m fs.FileMode) error {
	kind := "special file"
	switch {
	case m&fs.ModeNamedPipe != 0:
		kind = "named pipe"
	case m&fs.ModeSocket != 0:
		kind = "socket"
	case m&fs.ModeDevice != 0:
		kind = "device"
	case m.IsDir():
		kind = "directory"
	}
	return fmt.Errorf("%s: not a regular file (%s)", path, kind)
}
