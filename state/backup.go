package state

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Backup writes a consistent copy of the database to w and returns the
// number of bytes written. The copy is made with VACUUM INTO, which reads
// one snapshot of the database (mutations may continue meanwhile) and
// produces a compact, self-contained file with no WAL to ship alongside.
//
// The copy is staged next to the database, where there is room for one
// (the directory has to hold the database anyway), or in os.TempDir when
// that directory is not writable. Either way it is removed before Backup
// returns.
func (s *Store) Backup(ctx context.Context, w io.Writer) (int64, error) {
	f, err := os.CreateTemp(filepath.Dir(s.path), ".portcullis-backup-*.db")
	if err != nil {
		f, err = os.CreateTemp("", "portcullis-backup-*.db")
	}
	if err != nil {
		return 0, fmt.Errorf("state: backup %s: %w", s.path, err)
	}
	tmp := f.Name()
	f.Close()
	defer os.Remove(tmp)

	// VACUUM INTO accepts an existing empty file, so the name reserved by
	// CreateTemp (mode 0600: overrides are operator data) is used as is.
	if _, err := s.rdb.ExecContext(ctx, `VACUUM INTO ?`, tmp); err != nil {
		return 0, fmt.Errorf("state: backup %s: %w", s.path, err)
	}
	if f, err = os.Open(tmp); err != nil {
		return 0, fmt.Errorf("state: backup %s: %w", s.path, err)
	}
	defer f.Close()
	n, err := io.Copy(w, f)
	if err != nil {
		return n, fmt.Errorf("state: backup %s: %w", s.path, err)
	}
	return n, nil
}
