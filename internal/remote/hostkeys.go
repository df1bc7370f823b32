package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// hostKeyChecker returns a callback that enforces known_hosts strictly, and
// the host key algorithms to ask for.
//
// The algorithms matter: x/crypto prefers RSA/ECDSA host keys while OpenSSH
// records ED25519 ones, so without pinning the server could legitimately
// present a key type we have no record of, and knownhosts would report that
// as a mismatch -- a false "host key changed". We ask only for the types
// known_hosts has for this host.
func hostKeyChecker(t Target, khPath string) (ssh.HostKeyCallback, []string, error) {
	kh, err := knownhosts.New(khPath)
	if errors.Is(err, os.ErrNotExist) {
		kh = nil // behaves as an empty file: every host is unknown
	} else if err != nil {
		return nil, nil, fmt.Errorf("read known hosts %s: %w", khPath, err)
	}

	var algos []string
	if kh != nil {
		for _, k := range knownKeys(kh, t) {
			algos = append(algos, algosForKeyType(k.Key.Type())...)
		}
		algos = dedupe(algos)
	}

	cb := func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		var kerr *knownhosts.KeyError
		if kh != nil {
			err := kh(hostname, remote, key)
			if err == nil {
				return nil
			}
			if !errors.As(err, &kerr) {
				// Revoked keys and malformed input: refuse, say why.
				return fmt.Errorf("%w: host key of %s refused: %v", ErrHostKeyChanged, t.addr(), err)
			}
		}
		if kerr == nil || len(kerr.Want) == 0 {
			return unknownHostError(t, khPath, key)
		}
		return changedHostError(t, khPath, key, kerr.Want)
	}
	return cb, algos, nil
}

// knownKeys lists the keys known_hosts holds for t, by asking the callback
// about a key that cannot match: its KeyError lists what it wanted.
func knownKeys(kh ssh.HostKeyCallback, t Target) []knownhosts.KnownKey {
	err := kh(t.addr(), fakeRemote(t), probeKey{})
	var kerr *knownhosts.KeyError
	if errors.As(err, &kerr) {
		return kerr.Want
	}
	return nil
}

func fakeRemote(t Target) net.Addr {
	ip := net.ParseIP(t.Host)
	if ip == nil {
		ip = net.IPv4zero
	}
	return &net.TCPAddr{IP: ip, Port: t.Port}
}

// probeKey is a public key that equals no real key.
type probeKey struct{}

func (probeKey) Type() string                        { return "rbee-probe" }
func (probeKey) Marshal() []byte                     { return []byte("rbee-probe-key") }
func (probeKey) Verify([]byte, *ssh.Signature) error { return errors.New("probe key") }

func algosForKeyType(typ string) []string {
	switch typ {
	case ssh.KeyAlgoRSA:
		// An "ssh-rsa" key is used with SHA-2 signatures nowadays.
		return []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	default:
		return []string{typ}
	}
}

func unknownHostError(t Target, khPath string, key ssh.PublicKey) error {
	scan := "ssh-keyscan "
	if t.Port != 22 {
		scan += "-p " + strconv.Itoa(t.Port) + " "
	}
	scan += t.Host + " >> " + shellQuoteIfNeeded(tildePath(khPath))
	return fmt.Errorf("%w: host key of %s is not in %s (it offered %s); check the fingerprint, then trust it with `rbee hive trust %s` or `%s`",
		ErrUnknownHost, t.addr(), tildePath(khPath), describeKey(key), t.name(), scan)
}

func changedHostError(t Target, khPath string, key ssh.PublicKey, want []knownhosts.KnownKey) error {
	var known []string
	for _, w := range want {
		known = append(known, fmt.Sprintf("%s (%s:%d)", describeKey(w.Key), tildePath(w.Filename), w.Line))
	}
	return fmt.Errorf("%w: THE HOST KEY OF %s HAS CHANGED; someone may be intercepting the connection (man-in-the-middle), or the machine was reinstalled. "+
		"It now offers %s but %s records %s. Connection refused. If you know the machine was reinstalled, remove the old entry with `ssh-keygen -R %s -f %s` and run `rbee hive trust %s`",
		ErrHostKeyChanged, t.addr(), describeKey(key), tildePath(khPath), strings.Join(known, ", "),
		shellQuoteIfNeeded(knownhosts.Normalize(t.addr())), shellQuoteIfNeeded(tildePath(khPath)), t.name())
}

// shellQuoteIfNeeded keeps suggested commands copy-pasteable without
// cluttering the common case with quotes. A leading ~/ stays unquoted so the
// user's shell still expands it.
func shellQuoteIfNeeded(s string) string {
	prefix := ""
	if strings.HasPrefix(s, "~/") {
		prefix, s = "~/", s[2:]
	}
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/:@,+=") == "" {
		return prefix + s
	}
	return prefix + shellQuote(s)
}

// errScanned aborts the handshake once ScanHostKey has the key.
var errScanned = errors.New("host key captured")

// ScanHostKey connects to t and returns the host key the server presents,
// without checking it against anything and without authenticating. It is
// for showing the user a fingerprint before Trust; never use its result
// without that confirmation. It prefers ED25519, like OpenSSH. Errors wrap
// ErrUnreachable or ErrTimeout.
func ScanHostKey(ctx context.Context, t Target, opts ...Option) (ssh.PublicKey, error) {
	s := buildSettings(opts)
	if err := t.validate(); err != nil {
		return nil, err
	}
	var got ssh.PublicKey
	cfg := &ssh.ClientConfig{
		User: t.User,
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			got = key
			return errScanned
		},
		HostKeyAlgorithms: []string{
			ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256, ssh.KeyAlgoECDSA384, ssh.KeyAlgoECDSA521,
			ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256,
		},
		ClientVersion: "SSH-2.0-rbee",
	}
	c, err := handshake(ctx, t, s.timeout, cfg, func(error) error {
		if got != nil {
			return errScanned
		}
		return nil
	})
	if c != nil {
		c.Close()
	}
	if got != nil {
		return got, nil
	}
	if err == nil {
		err = fmt.Errorf("SSH server %s presented no host key", t.addr())
	}
	return nil, err
}

// Trust records key as the host key of t in knownHostsPath ("" means
// ~/.ssh/known_hosts), as "host key" or "[host]:port key" for non-22 ports,
// creating the directory (0700) and file (0600) if needed. It is a no-op if
// the key is already recorded, and it refuses (ErrHostKeyChanged) if a
// different key of the same type is recorded: replacing a key must be a
// deliberate manual step.
func Trust(t Target, key ssh.PublicKey, knownHostsPath string) error {
	if key == nil {
		return errors.New("trust: nil host key")
	}
	if err := t.validate(); err != nil {
		return err
	}
	path := defaultKnownHosts(knownHostsPath)

	existing, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("read known hosts: %w", err)
	default:
		kh, err := knownhosts.New(path)
		if err != nil {
			return fmt.Errorf("read known hosts %s: %w", path, err)
		}
		err = kh(t.addr(), fakeRemote(t), key)
		if err == nil {
			return nil
		}
		var kerr *knownhosts.KeyError
		if !errors.As(err, &kerr) {
			return fmt.Errorf("trust host key of %s: %w", t.addr(), err)
		}
		var same []knownhosts.KnownKey
		for _, w := range kerr.Want {
			if w.Key.Type() == key.Type() {
				same = append(same, w)
			}
		}
		if len(same) > 0 {
			return changedHostError(t, path, key, same)
		}
	}

	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open known hosts: %w", err)
	}
	line := knownhosts.Line([]string{t.addr()}, key) + "\n"
	if len(existing) > 0 && !bytes.HasSuffix(existing, []byte("\n")) {
		line = "\n" + line // never glue our entry onto someone's last line
	}
	if _, err := f.WriteString(line); err != nil {
		f.Close()
		return fmt.Errorf("write known hosts %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write known hosts %s: %w", path, err)
	}
	return nil
}
