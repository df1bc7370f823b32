package auth

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// Authority decides, for the embedded bus, who may connect and with which
// permissions. A connection must sign the server's nonce with the key of a
// credential the store lists; it is then held to its principal's
// permissions. The store is read again whenever its file changes, so a
// credential `rbee creds` issues works at once, and one it revokes is
// refused at the next connect (and its open connections closed by Run).
type Authority struct {
	store *Store
	space subjects.Space
	log   zerolog.Logger

	mu    sync.Mutex
	byKey map[string]Credential
	stamp os.FileInfo
	srv   *server.Server
	// closing are credentials seen revoked whose connections are still to
	// be closed (a reload during a connect finds them, Run closes them).
	closing []Credential
}

// NewAuthority checks connections against store's credentials in space.
func NewAuthority(store *Store, space subjects.Space, log zerolog.Logger) (*Authority, error) {
	a := &Authority{store: store, space: space, log: log}
	if err := a.refresh(); err != nil {
		return nil, err
	}
	return a, nil
}

// Store is the credential store the authority reads.
func (a *Authority) Store() *Store { return a.store }

// Attach gives the authority the server it guards, so Run can close the
// connections of revoked credentials.
func (a *Authority) Attach(srv *server.Server) {
	a.mu.Lock()
	a.srv = srv
	a.mu.Unlock()
}

// Check implements server.Authentication.
func (a *Authority) Check(c server.ClientAuthentication) bool {
	opts := c.GetOpts()
	if opts == nil || opts.Nkey == "" {
		a.log.Warn().Str("remote", addr(c)).Msg("bus connection refused: it presented no rbee credential")
		return false
	}
	if err := a.refresh(); err != nil {
		a.log.Error().Err(err).Msg("reading credentials")
	}
	a.mu.Lock()
	cred, ok := a.byKey[opts.Nkey]
	a.mu.Unlock()
	if !ok {
		a.log.Warn().Str("remote", addr(c)).Str("key", opts.Nkey).Msg("bus connection refused: unknown or revoked credential")
		return false
	}
	sig, err := base64.RawURLEncoding.DecodeString(opts.Sig)
	if err != nil {
		if sig, err = base64.StdEncoding.DecodeString(opts.Sig); err != nil {
			return false
		}
	}
	pk, err := nkeys.FromPublicKey(opts.Nkey)
	if err != nil || pk.Verify(c.GetNonce(), sig) != nil {
		a.log.Warn().Str("remote", addr(c)).Str("credential", cred.Name).Msg("bus connection refused: bad signature")
		return false
	}
	c.RegisterUser(&server.User{Username: cred.Name, Permissions: Permissions(a.space, cred.Principal, cred.PublicKey)})
	return true
}

func addr(c server.ClientAuthentication) string {
	if a := c.RemoteAddress(); a != nil {
		return a.String()
	}
	return "in-process"
}

// refresh reads the store again when its file changed since the last read;
// credentials no longer issued are queued for closeRevoked.
func (a *Authority) refresh() error {
	fi, statErr := os.Stat(filepath.Join(a.store.Dir(), Registry))
	a.mu.Lock()
	defer a.mu.Unlock()
	if statErr == nil && a.stamp != nil && os.SameFile(fi, a.stamp) && fi.ModTime().Equal(a.stamp.ModTime()) && fi.Size() == a.stamp.Size() {
		return nil
	}
	creds, err := a.store.read()
	if err != nil {
		return err
	}
	next := make(map[string]Credential, len(creds))
	for _, c := range creds {
		next[c.PublicKey] = c
	}
	for k, c := range a.byKey {
		if _, still := next[k]; !still {
			a.closing = append(a.closing, c)
		}
	}
	a.byKey = next
	if statErr == nil {
		a.stamp = fi
	}
	return nil
}

// Run reads the store every interval until ctx ends, and closes the open
// connections of every credential revoked since the last read.
func (a *Authority) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := a.refresh(); err != nil {
			a.log.Error().Err(err).Msg("reading credentials")
		}
		a.closeRevoked()
	}
}

// Revoke removes a credential from the store and closes its connections at
// once (the queen's own path, for workers that are gone).
func (a *Authority) Revoke(name string) error {
	if _, err := a.store.Revoke(name); err != nil {
		return err
	}
	err := a.refresh()
	a.closeRevoked()
	return err
}

func (a *Authority) closeRevoked() {
	a.mu.Lock()
	srv, revoked := a.srv, a.closing
	if srv != nil {
		a.closing = nil
	}
	a.mu.Unlock()
	if srv == nil {
		return
	}
	for _, c := range revoked {
		conns, err := srv.Connz(&server.ConnzOptions{User: c.PublicKey, Limit: 1 << 16})
		if err != nil {
			continue
		}
		for _, ci := range conns.Conns {
			_ = srv.DisconnectClientByID(ci.Cid)
		}
		if len(conns.Conns) > 0 {
			a.log.Info().Str("credential", c.Name).Int("connections", len(conns.Conns)).Msg("closed the connections of a revoked credential")
		}
	}
}
