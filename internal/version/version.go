// Package version holds the rbee version, set at build time with
// -ldflags "-X github.com/rbee-dev/rbee/internal/version.Version=...".
package version

// Version is semver, as nats micro requires for service versions.
var Version = "0.1.0"
