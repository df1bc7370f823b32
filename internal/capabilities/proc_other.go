//go:build !unix

package capabilities

import "os/exec"

// killProcessGroupOnCancel is a no-op where process groups do not exist;
// exec.CommandContext kills the child and Cmd.WaitDelay bounds the wait.
func killProcessGroupOnCancel(*exec.Cmd) {}
