//go:build unix

package capabilities

import (
	"os/exec"
	"syscall"
)

// killProcessGroupOnCancel runs cmd in its own process group and makes
// context cancellation kill the whole group. exec.CommandContext alone kills
// only the direct child; if that is a script (or nvidia-smi forks), the
// grandchildren survive, keep running and keep our pipes open.
func killProcessGroupOnCancel(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
			return cmd.Process.Kill()
		}
		return nil
	}
}
