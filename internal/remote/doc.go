// Package remote is rbee's SSH layer: it resolves user-supplied machine specs
// (user@host:port or ~/.ssh/config aliases), connects with key-based auth and
// strict known_hosts checking, and runs, starts, watches and uploads things on
// the remote machine through the user's login shell.
//
// Everything is done with plain POSIX shell commands over exec sessions (no
// sftp, no remote agent) because the only thing rbee can assume on a fresh
// machine is sshd and a shell. Every path or argument interpolated into a
// remote command is single-quoted; a leading "~/" in a remote path is turned
// into "$HOME"/ so that it is expanded by the remote shell, not by us.
//
// Failures a user can fix are reported as wrapped sentinel errors
// (ErrUnknownHost, ErrHostKeyChanged, ErrAuth, ErrUnreachable, ErrTimeout,
// ErrCommandNotFound) whose messages name the host and say what to do, so
// callers can both branch with errors.Is and print the error as-is.
package remote
