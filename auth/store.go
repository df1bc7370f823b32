package auth

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nkeys"
)

// ErrUnknownCredential is returned for a credential name the store does not
// hold (never issued, or revoked).
var ErrUnknownCredential = errors.New("no such credential")

// ErrCredentialExists is returned when a name is issued twice.
var ErrCredentialExists = errors.New("credential already issued")

// Credential is one issued credential: who it speaks for and the public half
// of its key. The private half (the seed) lives only with its holder.
type Credential struct {
	Name      string    `json:"name"`
	Principal Principal `json:"principal"`
	PublicKey string    `json:"public_key"`
	IssuedAt  time.Time `json:"issued_at"`
}

// Store is the list of issued credentials of one queen, in a directory of
// the queen's machine (<data>/creds): registry.json names every credential
// the bus accepts, and <name>.nk holds the seed of each credential that
// lives on this machine (the queen's, the local client's, each hive's until
// it is installed elsewhere). Both the queen and `rbee creds` write it, each
// under an exclusive lock and by atomic rename, so a reader never sees half
// a file. A credential not in registry.json is refused at its next connect.
type Store struct {
	dir string
}

// Registry is the file name of the list of issued credentials.
const Registry = "registry.json"

// OpenStore opens (creating it, mode 0700) the credential directory dir.
func OpenStore(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("credentials directory: %w", err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// KeyFile is where the seed of the named credential is kept on this machine.
func (s *Store) KeyFile(name string) string { return filepath.Join(s.dir, name+".nk") }

// List returns every issued credential, by name.
func (s *Store) List() ([]Credential, error) {
	creds, err := s.read()
	if err != nil {
		return nil, err
	}
	sort.Slice(creds, func(i, j int) bool { return creds[i].Name < creds[j].Name })
	return creds, nil
}

// Get returns the named credential.
func (s *Store) Get(name string) (Credential, error) {
	creds, err := s.read()
	if err != nil {
		return Credential{}, err
	}
	for _, c := range creds {
		if c.Name == name {
			return c, nil
		}
	}
	return Credential{}, fmt.Errorf("%w: %q", ErrUnknownCredential, name)
}

// Issue makes a new key pair for p under name and records its public key.
// The seed is returned, and also written to KeyFile(name) (mode 0600)
// unless p is a worker: a worker's seed goes to its hive and nowhere else.
func (s *Store) Issue(name string, p Principal) (Credential, []byte, error) {
	if err := ValidateName(name); err != nil {
		return Credential{}, nil, err
	}
	if err := p.Validate(); err != nil {
		return Credential{}, nil, err
	}
	var cred Credential
	var seed []byte
	err := s.update(func(creds []Credential) ([]Credential, error) {
		for _, c := range creds {
			if c.Name == name {
				return nil, fmt.Errorf("%w: %q (revoke it first, or choose another name)", ErrCredentialExists, name)
			}
		}
		kp, err := nkeys.CreateUser()
		if err != nil {
			return nil, err
		}
		if seed, err = kp.Seed(); err != nil {
			return nil, err
		}
		pub, err := kp.PublicKey()
		if err != nil {
			return nil, err
		}
		if p.Role != RoleWorker {
			if err := WriteKeyFile(s.KeyFile(name), name, p, seed, nil); err != nil {
				return nil, err
			}
		}
		cred = Credential{Name: name, Principal: p, PublicKey: pub, IssuedAt: time.Now().UTC()}
		return append(creds, cred), nil
	})
	return cred, seed, err
}

// Ensure returns the named credential, issuing it first when it is missing
// or its key file is gone. It is how the queen makes its own credentials,
// the local client's and local hives' at start.
func (s *Store) Ensure(name string, p Principal) (Credential, error) {
	if c, err := s.Get(name); err == nil {
		if c.Principal == p {
			if _, err := os.Stat(s.KeyFile(name)); err == nil {
				return c, nil
			}
		}
		if _, err := s.Revoke(name); err != nil {
			return Credential{}, err
		}
	} else if !errors.Is(err, ErrUnknownCredential) {
		return Credential{}, err
	}
	c, _, err := s.Issue(name, p)
	if errors.Is(err, ErrCredentialExists) {
		// Another process issued it between our read and write.
		return s.Get(name)
	}
	return c, err
}

// Revoke removes the named credential and its key file: the bus refuses it
// from its next connection on, and closes the connections it holds.
func (s *Store) Revoke(name string) (Credential, error) {
	var gone Credential
	err := s.update(func(creds []Credential) ([]Credential, error) {
		for i, c := range creds {
			if c.Name == name {
				gone = c
				return append(creds[:i], creds[i+1:]...), nil
			}
		}
		return nil, fmt.Errorf("%w: %q", ErrUnknownCredential, name)
	})
	if err != nil {
		return Credential{}, err
	}
	if err := os.Remove(s.KeyFile(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return gone, err
	}
	return gone, nil
}

func (s *Store) read() ([]Credential, error) {
	data, err := os.ReadFile(filepath.Join(s.dir, Registry))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read credentials: %w", err)
	}
	var f registryFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("credentials file %s is corrupt: %w", filepath.Join(s.dir, Registry), err)
	}
	return f.Credentials, nil
}

type registryFile struct {
	Credentials []Credential `json:"credentials"`
}

// update applies fn to the list under the store's lock and writes the result
// by atomic rename.
func (s *Store) update(fn func([]Credential) ([]Credential, error)) error {
	unlock, err := lockDir(s.dir)
	if err != nil {
		return err
	}
	defer unlock()
	creds, err := s.read()
	if err != nil {
		return err
	}
	creds, err = fn(creds)
	if err != nil {
		return err
	}
	data, err := json.MarshalIndent(registryFile{Credentials: creds}, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(filepath.Join(s.dir, Registry), data)
}

func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// ValidateName checks a credential name: 1-100 characters from
// [A-Za-z0-9_.-], not starting with '.', so it is safe as a file name.
func ValidateName(name string) error {
	if name == "" || len(name) > 100 || name[0] == '.' || strings.Contains(name, "..") {
		return fmt.Errorf("invalid credential name %q: use 1-100 characters from A-Z a-z 0-9 . _ -, not starting with '.'", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return fmt.Errorf("invalid credential name %q: %q is not allowed; use A-Z a-z 0-9 . _ -", name, rune(c))
		}
	}
	return nil
}

// WriteKeyFile writes a credential's seed to path, mode 0600, in the form
// the `nats` CLI reads with --nkey: a comment, then the seed on its own line.
// ca, when given, is the bus's CA certificate (PEM), written after the seed
// so that the key and the means to verify the bus travel as one file.
func WriteKeyFile(path, name string, p Principal, seed, ca []byte) error {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# rbee credential %q, role %s%s. This file is the key: keep it secret.\n", name, p.Role, scopeText(p))
	b.Write(seed)
	b.WriteByte('\n')
	if len(ca) > 0 {
		b.WriteString("# the bus's CA certificate\n")
		b.Write(ca)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return writeAtomic(path, b.Bytes())
}

func scopeText(p Principal) string {
	switch p.Role {
	case RoleHive:
		return " of hive " + p.Hive
	case RoleWorker:
		return fmt.Sprintf(" of worker %s (hive %s, model %s)", p.Worker, p.Hive, p.ModelKey)
	}
	return ""
}

// ErrNoKey is returned for a key file that holds no user seed.
var ErrNoKey = errors.New("no rbee credential key in file")

// ReadKeyFile reads the key pair of a file WriteKeyFile wrote (or any file
// with a user seed on a line of its own, as `nats --nkey` reads).
func ReadKeyFile(path string) (nkeys.KeyPair, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseKey(data)
}

// ParseKey finds the user seed in data.
func ParseKey(data []byte) (nkeys.KeyPair, error) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if bytes.HasPrefix(line, []byte("SU")) {
			kp, err := nkeys.FromSeed(line)
			if err != nil {
				return nil, fmt.Errorf("%w: the seed does not parse (%v)", ErrNoKey, err)
			}
			return kp, nil
		}
	}
	return nil, ErrNoKey
}

// Names of the credentials the queen issues by itself.
const (
	// QueenName is the queen's own credential.
	QueenName = "queen"
	// ClientName is the client credential of the queen's machine, which
	// the keeper there finds by itself.
	ClientName = "client"
)

// HiveName is the name of hive's credential.
func HiveName(hive string) string { return "hive-" + hive }

// WorkerName is the name of the credential of worker of hive.
func WorkerName(hive, worker string) string { return "worker-" + hive + "." + worker }

// KeyFileCA returns the CA certificate (PEM) a key file carries, or nil.
func KeyFileCA(path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	if i := bytes.Index(data, []byte("-----BEGIN CERTIFICATE-----")); i >= 0 {
		return data[i:]
	}
	return nil
}
