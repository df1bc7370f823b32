package binaries

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// ownerLock is the file in each directory that its test process holds an
// exclusive flock on while it lives. The kernel drops the lock when the
// process dies, however it dies, and flock works across PID namespaces,
// which a PID written into the name would not.
const ownerLock = ".owner.lock"

// staleAfter is how old a directory without an owner lock must be before
// sweep removes it: one made by a build of this package from before the
// lock existed, or one whose owner died between creating it and locking.
// A new directory is locked within microseconds, and no test run lasts
// this long.
const staleAfter = 2 * time.Hour

// makeOwnedDir creates this process's directory under root and locks it.
func makeOwnedDir(root string) (string, func(), error) {
	d, err := os.MkdirTemp(root, dirPattern)
	if err != nil {
		return "", nil, err
	}
	f, err := os.OpenFile(filepath.Join(d, ownerLock), os.O_CREATE|os.O_RDWR, 0o600)
	if err == nil {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err != nil {
			f.Close()
		}
	}
	if err != nil {
		_ = os.RemoveAll(d)
		return "", nil, err
	}
	return d, func() { _ = f.Close() }, nil
}

// sweep removes the directories under root that test processes left when
// they died before Main could remove them: those whose owner lock nobody
// holds. A live process's directory is never touched.
func sweep(root string) {
	dirs, _ := filepath.Glob(filepath.Join(root, dirPattern+"*"))
	for _, d := range dirs {
		st, err := os.Lstat(d)
		if err != nil || !st.IsDir() {
			continue
		}
		f, err := os.OpenFile(filepath.Join(d, ownerLock), os.O_RDWR, 0)
		if errors.Is(err, os.ErrNotExist) {
			if time.Since(st.ModTime()) > staleAfter {
				_ = os.RemoveAll(d)
			}
			continue
		}
		if err != nil {
			continue // not ours to judge (another user's, unreadable)
		}
		if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil {
			_ = os.RemoveAll(d) // the owner is gone
		}
		f.Close()
	}
}
