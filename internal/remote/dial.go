package remote

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
)

// Client is an authenticated SSH connection to one machine. It is safe for
// concurrent use; every method opens its own SSH session.
type Client struct {
	target Target
	conn   *ssh.Client
}

// Target returns the machine this client is connected to.
func (c *Client) Target() Target { return c.target }

// Close closes the connection. Processes started with Start keep running.
func (c *Client) Close() error { return c.conn.Close() }

// Dial connects to t and authenticates with public keys: the WithIdentity
// files, then t.IdentityFiles (or, when both are empty, whichever of
// ~/.ssh/id_ed25519, id_ecdsa, id_rsa exist), then the ssh-agent. The host
// key must already be in known_hosts (see Trust); an unknown or changed key
// is refused. Connect plus handshake is bounded by WithTimeout and by ctx.
//
// Errors wrap ErrUnreachable, ErrTimeout, ErrUnknownHost, ErrHostKeyChanged
// or ErrAuth, with a message that says what to do.
func Dial(ctx context.Context, t Target, opts ...Option) (*Client, error) {
	s := buildSettings(opts)
	if err := t.validate(); err != nil {
		return nil, err
	}

	khPath := s.knownHostsPath()
	hostKeyCB, hostKeyAlgos, err := hostKeyChecker(t, khPath)
	if err != nil {
		return nil, err
	}
	auth, closeAgent := collectAuth(t, s)
	defer closeAgent()

	// The callback's error is what the user needs to see; x/crypto buries it
	// in "ssh: handshake failed: ...", so keep our own copy.
	var hostKeyErr error
	cfg := &ssh.ClientConfig{
		User: t.User,
		Auth: auth.methods(),
		HostKeyCallback: func(hostname string, remote net.Addr, key ssh.PublicKey) error {
			hostKeyErr = hostKeyCB(hostname, remote, key)
			return hostKeyErr
		},
		HostKeyAlgorithms: hostKeyAlgos,
		ClientVersion:     "SSH-2.0-rbee",
	}

	sc, err := handshake(ctx, t, s.timeout, cfg, func(err error) error {
		if hostKeyErr != nil {
			return hostKeyErr
		}
		if isAuthFailure(err) {
			return auth.failure(t, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &Client{target: t, conn: sc}, nil
}

func (t Target) validate() error {
	if t.Host == "" || t.User == "" || t.Port < 1 || t.Port > 65535 {
		return fmt.Errorf("incomplete SSH target %+v; build it with ParseTarget", t)
	}
	return nil
}

// handshake dials TCP and runs the SSH handshake under one deadline, so a
// port that accepts but never speaks SSH still times out. classify may turn
// a handshake error into a more specific one (returning nil to decline).
func handshake(ctx context.Context, t Target, timeout time.Duration, cfg *ssh.ClientConfig, classify func(error) error) (*ssh.Client, error) {
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()

	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", t.addr())
	if err != nil {
		return nil, dialError(parent, t, timeout, err)
	}
	// x/crypto's handshake has no context; a deadline on the socket bounds
	// it, and AfterFunc makes cancellation interrupt it immediately.
	_ = conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })

	c, chans, reqs, err := ssh.NewClientConn(conn, t.addr(), cfg)
	if !stop() && err == nil {
		// ctx ended right after the handshake; honour it anyway.
		c.Close()
		err = ctx.Err()
	}
	if err != nil {
		conn.Close()
		if classify != nil {
			if cerr := classify(err); cerr != nil {
				return nil, cerr
			}
		}
		switch {
		case parent.Err() != nil && !errors.Is(parent.Err(), context.DeadlineExceeded):
			return nil, fmt.Errorf("SSH handshake with %s: %w", t, parent.Err())
		case ctx.Err() != nil || isTimeout(err) || !time.Now().Before(deadline):
			return nil, fmt.Errorf("%w: %s accepted the connection but did not complete the SSH handshake within %s; is an SSH server (and not something else) listening on port %d?",
				ErrTimeout, t.addr(), timeout, t.Port)
		}
		return nil, fmt.Errorf("SSH handshake with %s failed: %w", t, err)
	}
	_ = conn.SetDeadline(time.Time{})
	return ssh.NewClient(c, chans, reqs), nil
}

func dialError(parent context.Context, t Target, timeout time.Duration, err error) error {
	if perr := parent.Err(); perr != nil && !errors.Is(perr, context.DeadlineExceeded) {
		return fmt.Errorf("connect to %s: %w", t.addr(), perr)
	}
	if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		return fmt.Errorf("%w: could not connect to %s within %s; is the machine up, and is port %d open in its firewall?: %v",
			ErrTimeout, t.addr(), timeout, t.Port, err)
	}
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w: connection to %s refused; is sshd running there and listening on port %d?", ErrUnreachable, t.addr(), t.Port)
	case errors.As(err, &dnsErr):
		return fmt.Errorf("%w: cannot resolve host name %q (%v); check the name or the HostName in ~/.ssh/config", ErrUnreachable, t.Host, err)
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTDOWN):
		return fmt.Errorf("%w: no route to %s; is the machine on and on this network?: %v", ErrUnreachable, t.addr(), err)
	}
	return fmt.Errorf("%w: connect to %s: %v", ErrUnreachable, t.addr(), err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func isAuthFailure(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "unable to authenticate") ||
		strings.Contains(msg, "Too many authentication failures") ||
		strings.Contains(msg, "no supported methods remain")
}

// --- authentication ---------------------------------------------------------

type authSet struct {
	signers []ssh.Signer
	tried   []string // human descriptions, in offer order
	skipped []string // keys we could not use, with the reason
}

func (a *authSet) methods() []ssh.AuthMethod {
	if len(a.signers) == 0 {
		return nil
	}
	return []ssh.AuthMethod{ssh.PublicKeys(a.signers...)}
}

func (a *authSet) failure(t Target, err error) error {
	var b strings.Builder
	if len(a.tried) == 0 {
		fmt.Fprintf(&b, "%s: no usable SSH key to log in to %s", ErrAuth, t)
	} else {
		fmt.Fprintf(&b, "%s: %s accepted none of the keys offered for user %q (tried %s)", ErrAuth, t.addr(), t.User, strings.Join(a.tried, ", "))
	}
	if len(a.skipped) > 0 {
		fmt.Fprintf(&b, "; skipped %s", strings.Join(a.skipped, ", "))
	}
	fmt.Fprintf(&b, "; add your public key to ~%s/.ssh/authorized_keys on that machine (ssh-copy-id -p %d %s), or point IdentityFile at the right key in ~/.ssh/config", t.User, t.Port, t.User+"@"+t.Host)
	return &authError{msg: b.String(), cause: err}
}

// authError keeps the x/crypto error reachable for debugging while the
// message stays the readable one.
type authError struct {
	msg   string
	cause error
}

func (e *authError) Error() string   { return e.msg }
func (e *authError) Unwrap() []error { return []error{ErrAuth, e.cause} }

func collectAuth(t Target, s settings) (*authSet, func()) {
	a := &authSet{}
	files := dedupe(append(expandAll(s.identities), t.IdentityFiles...))
	explicit := len(files) > 0
	if !explicit {
		// Same defaults as OpenSSH, minus the legacy ones nobody has.
		if h, err := os.UserHomeDir(); err == nil {
			for _, n := range []string{"id_ed25519", "id_ecdsa", "id_rsa"} {
				files = append(files, filepath.Join(h, ".ssh", n))
			}
		}
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			if explicit {
				a.skipped = append(a.skipped, fmt.Sprintf("%s (%v)", tildePath(f), errors.Unwrap(err)))
			}
			continue
		}
		signer, err := ssh.ParsePrivateKey(b)
		var pm *ssh.PassphraseMissingError
		switch {
		case errors.As(err, &pm):
			a.skipped = append(a.skipped, fmt.Sprintf("%s (has a passphrase; add it to ssh-agent with ssh-add)", tildePath(f)))
			continue
		case err != nil:
			a.skipped = append(a.skipped, fmt.Sprintf("%s (%v)", tildePath(f), err))
			continue
		}
		a.signers = append(a.signers, signer)
		a.tried = append(a.tried, fmt.Sprintf("%s (%s)", tildePath(f), describeKey(signer.PublicKey())))
	}

	closeAgent := func() {}
	if s.useAgent() {
		sock := os.Getenv("SSH_AUTH_SOCK")
		conn, err := net.DialTimeout("unix", sock, 2*time.Second)
		if err != nil {
			a.skipped = append(a.skipped, fmt.Sprintf("ssh-agent at %s (%v)", sock, err))
		} else {
			closeAgent = func() { conn.Close() }
			ac := agent.NewClient(conn)
			signers, err := ac.Signers()
			if err != nil {
				a.skipped = append(a.skipped, fmt.Sprintf("ssh-agent (%v)", err))
			}
			keys, _ := ac.List()
			for i, sg := range signers {
				a.signers = append(a.signers, sg)
				comment := ""
				if i < len(keys) && keys[i].Comment != "" {
					comment = keys[i].Comment + " "
				}
				a.tried = append(a.tried, fmt.Sprintf("agent key %s(%s)", comment, describeKey(sg.PublicKey())))
			}
		}
	}
	return a, closeAgent
}

func expandAll(ps []string) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, expandHome(p))
	}
	return out
}

func describeKey(k ssh.PublicKey) string {
	typ := strings.ToUpper(strings.TrimPrefix(k.Type(), "ssh-"))
	if i := strings.IndexAny(typ, "-@"); i > 0 && strings.HasPrefix(typ, "ECDSA") {
		typ = "ECDSA"
	}
	return typ + " " + ssh.FingerprintSHA256(k)
}
