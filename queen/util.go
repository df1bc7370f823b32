package queen

import (
	"fmt"
	"syscall"

	"github.com/rbee-dev/rbee/hive/catalog"
)

func sprintf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

func humanBytes(n uint64) string { return catalog.HumanBytes(n) }

func signalPid(pid int, sig string) error {
	if pid <= 0 {
		return fmt.Errorf("no pid known")
	}
	s := syscall.SIGTERM
	if sig == "KILL" {
		s = syscall.SIGKILL
	}
	if err := syscall.Kill(pid, s); err != nil && err != syscall.ESRCH {
		return err
	}
	return nil
}
