// Package cliutil holds what the four programs' command lines share: the bus
// connection flags and log setup, so every program spells them the same.
package cliutil

import (
	"os"
	"path/filepath"

	"github.com/rbee-dev/rbee/bus"
	"github.com/urfave/cli/v2"
)

// Flag names shared by every program.
const (
	FlagNATS      = "nats"
	FlagCreds     = "creds"
	FlagCA        = "nats-ca"
	FlagToken     = "nats-token"
	FlagUser      = "nats-user"
	FlagPassword  = "nats-password"
	FlagNamespace = "namespace"
	FlagLogLevel  = "log-level"
	FlagLogFile   = "log-file"
)

// BusFlags are the flags that say how to reach the bus.
func BusFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: FlagNATS, Usage: "NATS server URL (comma-separated for a cluster)", EnvVars: []string{"RBEE_NATS_URL"}},
		&cli.StringFlag{Name: FlagCreds, Usage: "file holding this program's rbee credential (`rbee creds issue` writes one)", EnvVars: []string{"RBEE_CREDS"}},
		&cli.StringFlag{Name: FlagCA, Usage: "CA certificate that signed the bus's TLS certificate (for tls:// URLs)", EnvVars: []string{"RBEE_NATS_CA"}},
		&cli.StringFlag{Name: FlagToken, Usage: "NATS token (an external NATS set up by hand)", EnvVars: []string{"RBEE_NATS_TOKEN"}},
		&cli.StringFlag{Name: FlagUser, Usage: "NATS user", EnvVars: []string{"RBEE_NATS_USER"}},
		&cli.StringFlag{Name: FlagPassword, Usage: "NATS password", EnvVars: []string{"RBEE_NATS_PASSWORD"}},
		&cli.StringFlag{Name: FlagNamespace, Usage: "subject namespace, so clusters can share one NATS", Value: "rbee", EnvVars: []string{"RBEE_NAMESPACE"}},
	}
}

// LogFlags are the flags of a daemon's operator log.
func LogFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: FlagLogLevel, Usage: "log level: trace, debug, info, warn, error", Value: "info", EnvVars: []string{"RBEE_LOG_LEVEL"}},
		&cli.StringFlag{Name: FlagLogFile, Usage: "write the log to this file instead of stderr"},
	}
}

// Credentials reads the credential flags.
func Credentials(c *cli.Context) bus.Credentials {
	return bus.Credentials{KeyFile: c.String(FlagCreds), CAFile: c.String(FlagCA), Token: c.String(FlagToken), User: c.String(FlagUser), Password: c.String(FlagPassword)}
}

// CredentialEnv passes credentials to a child process through its
// environment rather than its arguments, which any user can read in ps.
func CredentialEnv(cr bus.Credentials) []string {
	var env []string
	if cr.Token != "" {
		env = append(env, "RBEE_NATS_TOKEN="+cr.Token)
	}
	if cr.User != "" {
		env = append(env, "RBEE_NATS_USER="+cr.User, "RBEE_NATS_PASSWORD="+cr.Password)
	}
	return env
}

// Home is rbee's data directory: $RBEE_HOME, else $XDG_DATA_HOME/rbee, else
// ~/.local/share/rbee.
func Home() string {
	if h := os.Getenv("RBEE_HOME"); h != "" {
		return h
	}
	if x := os.Getenv("XDG_DATA_HOME"); x != "" {
		return filepath.Join(x, "rbee")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "rbee")
	}
	return filepath.Join(home, ".local", "share", "rbee")
}

// QueenPIDFile is where a local queen records its pid, so `rbee queen stop`
// can find it.
func QueenPIDFile(home string) string { return filepath.Join(home, "queen.pid") }
