package regularfile

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestRead: a regular file, and a symlink to one, are read; a FIFO with
// no writer, a device, a directory and a Unix socket are refused at
// once with what they are; a limit refuses a longer file.
func TestRead(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "cert.pem")
	if err := os.WriteFile(file, []byte("0123456789"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.pem")
	if err := os.Symlink(file, link); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{file, link} {
		if b, err := Read(p, 10); err != nil || string(b) != "0123456789" {
			t.Errorf("Read(%s, 10) = %q, %v", p, b, err)
		}
	}
	if _, err := Read(file, 9); err == nil || !strings.Contains(err.Error(), "larger than 9 bytes") {
		t.Errorf("Read with a limit of 9: %v, want larger than 9 bytes", err)
	}

	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for path, kind := range map[string]string{fifo: "named pipe", "/dev/zero": "device", dir: "directory", sock: "socket"} {
		_, err := Read(path, 0)
		if want := path + ": not a regular file (" + kind + ")"; err == nil || err.Error() != want {
			t.Errorf("Read(%s) = %v, want %q", path, err, want)
		}
	}
}
