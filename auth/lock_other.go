//go:build !unix

package auth

// lockDir is a no-op where flock is missing: one writer at a time is then
// the user's to keep.
func lockDir(string) (func(), error) { return func() {}, nil }
