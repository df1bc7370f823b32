package remote

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Errors returned by this package wrap at most one of these
// (test with errors.Is); the wrapping error's message carries the details a
// user needs (host, port, file, and the command that fixes it).
var (
	// ErrUnknownHost means the server's host key is not in known_hosts. It is
	// never accepted implicitly; the user must trust it first (see Trust).
	ErrUnknownHost = errors.New("unknown SSH host key")

	// ErrHostKeyChanged means known_hosts holds a different key of the same
	// type for this host: either the machine was reinstalled or someone is
	// intercepting the connection. It is never accepted, and Trust refuses to
	// paper over it.
	ErrHostKeyChanged = errors.New("SSH HOST KEY CHANGED")

	// ErrAuth means the server accepted none of the keys we offered.
	ErrAuth = errors.New("SSH authentication failed")

	// ErrUnreachable means no TCP connection could be made (connection
	// refused, no route to host, unknown host name).
	ErrUnreachable = errors.New("SSH host unreachable")

	// ErrTimeout means connecting or the SSH handshake did not finish within
	// the configured timeout (or the context's deadline).
	ErrTimeout = errors.New("SSH connection timed out")

	// ErrCommandNotFound means the remote shell could not find the command
	// (exit status 127 or "command not found"); usually the rbee binaries are
	// not installed on that machine yet.
	ErrCommandNotFound = errors.New("command not found on remote host")
)

// ExitError is returned by Client.Run (and the helpers built on it) when the
// remote command ran but did not exit 0. It unwraps to ErrCommandNotFound when
// the shell reported that the command does not exist.
type ExitError struct {
	// Target is the machine the command ran on, as user@host:port.
	Target string
	// Cmd is the command line as sent to the remote shell.
	Cmd string
	// Code is the exit status; -1 when the command was killed by a signal.
	Code int
	// Signal is the signal name (e.g. "KILL") when the command died from a
	// signal, else "".
	Signal string
	// Stderr is the tail of the command's standard error, for the message.
	Stderr string
}

// Error names the machine, the exit status and the last lines of stderr,
// because the stderr tail is nearly always what explains the failure.
func (e *ExitError) Error() string {
	var b strings.Builder
	if e.notFound() {
		fmt.Fprintf(&b, "%s: ", ErrCommandNotFound)
	}
	fmt.Fprintf(&b, "remote command on %s ", e.Target)
	if e.Signal != "" {
		fmt.Fprintf(&b, "killed by signal %s", e.Signal)
	} else {
		fmt.Fprintf(&b, "exited with code %d", e.Code)
	}
	fmt.Fprintf(&b, " (%s)", abbrev(e.Cmd, 120))
	if s := strings.TrimSpace(e.Stderr); s != "" {
		fmt.Fprintf(&b, ": %s", s)
	}
	return b.String()
}

// Unwrap makes errors.Is(err, ErrCommandNotFound) work for exit status 127.
func (e *ExitError) Unwrap() error {
	if e.notFound() {
		return ErrCommandNotFound
	}
	return nil
}

func (e *ExitError) notFound() bool {
	// 127 is what every POSIX shell uses for "not found"; the text check
	// catches wrappers (env, nohup, sudo) that report it with another code.
	return e.Code == 127 || strings.Contains(e.Stderr, "command not found")
}

// tail returns at most the last n lines and maxBytes bytes of s, so error
// messages stay readable even when a command spews.
func tail(s string, n, maxBytes int) string {
	s = strings.TrimRight(s, "\n")
	if len(s) > maxBytes {
		s = "…" + s[len(s)-maxBytes:]
	}
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = append([]string{"…"}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

func abbrev(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
