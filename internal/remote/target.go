package remote

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kevinburke/ssh_config"
)

// DefaultTimeout bounds TCP connect plus SSH handshake when no WithTimeout
// option is given.
const DefaultTimeout = 10 * time.Second

// Target is a fully resolved SSH destination: after ParseTarget nothing about
// it depends on ~/.ssh/config any more.
type Target struct {
	// Alias is the name the user knows this machine by: the host as typed
	// (an ssh config Host alias or the literal host), or a hive's name set
	// by the caller. Host key errors tell the user to run
	// `rbee hive trust ALIAS`.
	Alias string
	// Host is the address to connect to (HostName from the config, if any).
	// IPv6 literals are stored without brackets.
	Host string
	// User is the remote login name.
	User string
	// Port is the TCP port, 22 unless the spec or the config says otherwise.
	Port int
	// IdentityFiles are private key paths (with ~ expanded) to try, in order,
	// before the agent. Empty means "the default ~/.ssh/id_* keys".
	IdentityFiles []string
}

// String formats the target as user@host:port (IPv6 hosts bracketed), the
// form used in every message of this package.
func (t Target) String() string {
	return t.User + "@" + t.addr()
}

func (t Target) addr() string {
	return net.JoinHostPort(t.Host, strconv.Itoa(t.Port))
}

// name is what we tell the user to pass to `rbee hive trust`.
func (t Target) name() string {
	if t.Alias != "" {
		return t.Alias
	}
	return t.Host
}

// Option tunes ParseTarget, Dial and ScanHostKey. The same options may be
// passed to all of them; each uses the ones that concern it.
type Option func(*settings)

type settings struct {
	configFile *string
	knownHosts string
	identities []string
	timeout    time.Duration
	agent      *bool
}

// WithConfigFile reads ssh config from path instead of ~/.ssh/config. A
// missing file is not an error (it resolves nothing); "" disables the config.
func WithConfigFile(path string) Option {
	return func(s *settings) { s.configFile = &path }
}

// WithKnownHosts verifies (and, for Trust callers, records) host keys in path
// instead of ~/.ssh/known_hosts.
func WithKnownHosts(path string) Option {
	return func(s *settings) { s.knownHosts = path }
}

// WithIdentity adds a private key file to try first. It may be repeated.
// A leading ~ is expanded.
func WithIdentity(path string) Option {
	return func(s *settings) { s.identities = append(s.identities, path) }
}

// WithTimeout bounds connect plus handshake (default DefaultTimeout). It does
// not bound commands run on the resulting Client; use their contexts.
func WithTimeout(d time.Duration) Option {
	return func(s *settings) { s.timeout = d }
}

// WithAgent turns use of the ssh-agent at $SSH_AUTH_SOCK on or off. By
// default the agent is used whenever SSH_AUTH_SOCK is set.
func WithAgent(use bool) Option {
	return func(s *settings) { s.agent = &use }
}

func buildSettings(opts []Option) settings {
	var s settings
	for _, o := range opts {
		o(&s)
	}
	if s.timeout <= 0 {
		s.timeout = DefaultTimeout
	}
	return s
}

func (s settings) configPath() string {
	if s.configFile != nil {
		return expandHome(*s.configFile)
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".ssh", "config")
	}
	return ""
}

func (s settings) knownHostsPath() string {
	return defaultKnownHosts(s.knownHosts)
}

func defaultKnownHosts(p string) string {
	if p != "" {
		return expandHome(p)
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".ssh", "known_hosts")
	}
	return filepath.Join(".ssh", "known_hosts")
}

func (s settings) useAgent() bool {
	if s.agent != nil {
		return *s.agent && os.Getenv("SSH_AUTH_SOCK") != ""
	}
	return os.Getenv("SSH_AUTH_SOCK") != ""
}

// ParseTarget resolves spec, which is "user@host[:port]", "host[:port]",
// "[ipv6]:port", a bare IPv6 address, or a Host alias from the ssh config
// (optionally with user@ and :port). From the config it honours HostName
// (with %h), User, Port and IdentityFile (with ~, %d, %u, %r, %h); values in
// the spec win over the config. Defaults: current local user, port 22.
// It does no network I/O.
func ParseTarget(spec string, opts ...Option) (Target, error) {
	s := buildSettings(opts)
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return Target{}, errors.New("empty SSH target; want user@host[:port] or an alias from ~/.ssh/config")
	}
	if strings.ContainsAny(spec, " \t\r\n/\\'\"`$;|&") {
		return Target{}, fmt.Errorf("invalid SSH target %q; want user@host[:port] or an alias from ~/.ssh/config", spec)
	}
	userPart, hostPort := "", spec
	if i := strings.LastIndex(spec, "@"); i >= 0 {
		userPart, hostPort = spec[:i], spec[i+1:]
		if userPart == "" {
			return Target{}, fmt.Errorf("invalid SSH target %q: empty user before @", spec)
		}
	}
	host, port, err := splitHostPort(hostPort)
	if err != nil {
		return Target{}, fmt.Errorf("invalid SSH target %q: %w", spec, err)
	}

	cfg, err := loadConfig(s.configPath())
	if err != nil {
		return Target{}, err
	}
	get := func(key string) string {
		if cfg == nil {
			return ""
		}
		v, _ := cfg.Get(host, key)
		return strings.TrimSpace(v)
	}

	t := Target{Alias: host, Host: host, User: userPart, Port: port}
	if hn := get("HostName"); hn != "" {
		t.Host = strings.Trim(strings.ReplaceAll(hn, "%h", host), "[]")
	}
	if t.User == "" {
		t.User = get("User")
	}
	if t.User == "" {
		if t.User, err = currentUser(); err != nil {
			return Target{}, err
		}
	}
	if t.Port == 0 {
		if p := get("Port"); p != "" {
			if t.Port, err = parsePort(p); err != nil {
				return Target{}, fmt.Errorf("ssh config %s: Host %s: %w", s.configPath(), host, err)
			}
		}
	}
	if t.Port == 0 {
		t.Port = 22
	}

	var ids []string
	for _, id := range s.identities {
		ids = append(ids, expandHome(id))
	}
	if cfg != nil {
		all, _ := cfg.GetAll(host, "IdentityFile")
		for _, id := range all {
			id = strings.Trim(strings.TrimSpace(id), `"`)
			if id == "" || strings.EqualFold(id, "none") {
				continue
			}
			ids = append(ids, expandIdentity(id, t, host))
		}
	}
	t.IdentityFiles = dedupe(ids)
	return t, nil
}

// splitHostPort accepts host, host:port, [v6], [v6]:port and bare v6.
func splitHostPort(s string) (host string, port int, err error) {
	if s == "" {
		return "", 0, errors.New("empty host")
	}
	if strings.HasPrefix(s, "[") {
		end := strings.Index(s, "]")
		if end < 0 {
			return "", 0, errors.New("missing ] in IPv6 address")
		}
		host, rest := s[1:end], s[end+1:]
		if host == "" {
			return "", 0, errors.New("empty host")
		}
		switch {
		case rest == "":
			return host, 0, nil
		case strings.HasPrefix(rest, ":"):
			port, err = parsePort(rest[1:])
			return host, port, err
		default:
			return "", 0, fmt.Errorf("unexpected %q after ]", rest)
		}
	}
	switch strings.Count(s, ":") {
	case 0:
		return s, 0, nil
	case 1:
		h, p, _ := strings.Cut(s, ":")
		if h == "" {
			return "", 0, errors.New("empty host")
		}
		port, err = parsePort(p)
		return h, port, err
	default:
		// A bare IPv6 literal; a port needs brackets to be unambiguous.
		if net.ParseIP(s) == nil {
			return "", 0, fmt.Errorf("%q is not an IPv6 address; write [addr]:port", s)
		}
		return s, 0, nil
	}
}

func parsePort(p string) (int, error) {
	n, err := strconv.Atoi(p)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("invalid port %q", p)
	}
	return n, nil
}

func loadConfig(path string) (*ssh_config.Config, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		// Most machines have no ~/.ssh/config; that is not a problem.
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read ssh config: %w", err)
	}
	defer f.Close()
	cfg, err := ssh_config.Decode(f)
	if err != nil {
		return nil, fmt.Errorf("parse ssh config %s: %w", path, err)
	}
	return cfg, nil
}

func currentUser() (string, error) {
	if u, err := user.Current(); err == nil && u.Username != "" {
		return u.Username, nil
	}
	if u := os.Getenv("USER"); u != "" {
		return u, nil
	}
	return "", errors.New("cannot determine the local user name; write the target as user@host")
}

// expandHome expands a leading "~" or "~/" to the local home directory.
func expandHome(p string) string {
	if p != "~" && !strings.HasPrefix(p, "~/") {
		return p
	}
	h, err := os.UserHomeDir()
	if err != nil {
		return p
	}
	return filepath.Join(h, p[1:])
}

// expandIdentity applies the ssh_config(5) tokens that make sense for
// IdentityFile, then ~.
func expandIdentity(p string, t Target, alias string) string {
	home, _ := os.UserHomeDir()
	local, _ := currentUser()
	r := strings.NewReplacer("%%", "%", "%d", home, "%u", local, "%r", t.User, "%h", t.Host, "%n", alias)
	return expandHome(r.Replace(p))
}

func dedupe(in []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// tildePath abbreviates the home directory to ~ so messages match what users
// type.
func tildePath(p string) string {
	if h, err := os.UserHomeDir(); err == nil && h != "" && h != "/" {
		if p == h {
			return "~"
		}
		if strings.HasPrefix(p, h+string(filepath.Separator)) {
			return "~" + p[len(h):]
		}
	}
	return p
}
