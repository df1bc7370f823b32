package queen

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
)

// TLSDir is where a queen keeps its bus's CA and certificate.
func TLSDir(dataDir string) string { return filepath.Join(dataDir, "tls") }

// CredentialsDir is where a queen with an embedded bus keeps the credentials
// it accepts (see auth.Store).
func CredentialsDir(dataDir string) string { return filepath.Join(dataDir, "creds") }

// CredentialsFile is the key file of the named credential on this queen's
// machine ("" when the queen issues none): for tests and benchmarks that
// act as the queen or as its local client.
func (q *Queen) CredentialsFile(name string) string {
	if q.authority == nil {
		return ""
	}
	return q.authority.Store().KeyFile(name)
}

// externalStore is the credential store of a queen on an external bus, when
// `rbee creds` made one in its data directory: the hives it starts get their
// keys from it (the bus knows them from `rbee creds server-config`).
func (q *Queen) externalStore() *auth.Store {
	dir := CredentialsDir(q.cfg.DataDir)
	if _, err := os.Stat(filepath.Join(dir, auth.Registry)); err != nil {
		return nil
	}
	store, err := auth.OpenStore(dir)
	if err != nil {
		return nil
	}
	return store
}

// openAuthority prepares the embedded bus's authority: the store, with the
// queen's own credential and the local client's issued on first start.
func (q *Queen) openAuthority() (*auth.Authority, error) {
	store, err := auth.OpenStore(CredentialsDir(q.cfg.DataDir))
	if err != nil {
		return nil, err
	}
	if _, err := store.Ensure(auth.QueenName, auth.Principal{Role: auth.RoleQueen}); err != nil {
		return nil, fmt.Errorf("the queen's credentials: %w", err)
	}
	if _, err := store.Ensure(auth.ClientName, auth.Principal{Role: auth.RoleClient}); err != nil {
		return nil, fmt.Errorf("the local client's credentials: %w", err)
	}
	space, err := subjects.New(q.cfg.Namespace)
	if err != nil {
		return nil, err
	}
	return auth.NewAuthority(store, space, q.log)
}

// hiveCredentials returns the key file of hive's credential, issuing it the
// first time; "" when this queen issues none (an external bus).
func (q *Queen) hiveCredentials(hive string) (string, error) {
	store := q.store
	if store == nil {
		return "", nil
	}
	name := auth.HiveName(hive)
	if _, err := store.Ensure(name, auth.Principal{Role: auth.RoleHive, Hive: hive}); err != nil {
		return "", fmt.Errorf("credentials of hive %s: %w", hive, err)
	}
	return store.KeyFile(name), nil
}

// workerCredentialsHandler answers a hive's request for the credentials of a
// worker it is about to start. The hive is the last token of the subject,
// which only that hive may publish on; the worker's permissions are scoped
// to that hive, that worker id and that model.
func (q *Queen) workerCredentialsHandler() micro.Handler {
	return micro.HandlerFunc(func(r micro.Request) {
		hive := subjects.WorkerIDFromKey(r.Subject())
		bus.Handler(q.endpoints, "worker-credentials", func(_ context.Context, req api.WorkerCredentialsRequest) (api.WorkerCredentialsReply, error) {
			p := auth.Principal{Role: auth.RoleWorker, Hive: hive, Worker: req.Worker, ModelKey: req.ModelKey}
			if err := p.Validate(); err != nil {
				return api.WorkerCredentialsReply{}, api.Errorf(api.CodeBadRequest, "worker credentials: %v", err)
			}
			name := auth.WorkerName(hive, req.Worker)
			store := q.authority.Store()
			if _, err := store.Revoke(name); err != nil && !errors.Is(err, auth.ErrUnknownCredential) {
				return api.WorkerCredentialsReply{}, err
			}
			_, seed, err := store.Issue(name, p)
			if err != nil {
				return api.WorkerCredentialsReply{}, err
			}
			return api.WorkerCredentialsReply{Name: name, Seed: string(seed)}, nil
		}).Handle(r)
	})
}

// workerGone queues the revocation of a worker's credential; the queue is
// drained by runCredentials (never on the registry's goroutine, which must
// not wait on a disk).
func (q *Queen) workerGone(last api.WorkerStatus) {
	if q.authority == nil || last.Hive == "" {
		return
	}
	select {
	case q.credsGone <- auth.WorkerName(last.Hive, last.ID):
	default: // the sweep will find it
	}
}

// runCredentials revokes the credentials of workers that are gone: at once
// for those the registry reports gone, and, every sweepEvery, those of
// workers not seen for longer than absentFor (a worker paused or cut off for
// less may come back, and keeps its key).
func (q *Queen) runCredentials(ctx context.Context) {
	const sweepEvery, absentFor = time.Minute, 3 * time.Minute
	go q.authority.Run(ctx, time.Second)
	t := time.NewTicker(sweepEvery)
	defer t.Stop()
	absent := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case name := <-q.credsGone:
			if err := q.authority.Revoke(name); err != nil && !errors.Is(err, auth.ErrUnknownCredential) {
				q.log.Warn().Err(err).Str("credential", name).Msg("revoking a gone worker's credential")
			}
		case now := <-t.C:
			q.sweepWorkerCredentials(now, absent, absentFor)
		}
	}
}

// sweepWorkerCredentials revokes the worker credentials whose worker has
// been absent from the registry for absentFor; absent holds when each was
// first seen missing.
func (q *Queen) sweepWorkerCredentials(now time.Time, absent map[string]time.Time, absentFor time.Duration) {
	snap := q.registry.Snapshot()
	if snap == nil || !q.registry.Settled() {
		return
	}
	creds, err := q.authority.Store().List()
	if err != nil {
		return
	}
	seen := map[string]bool{}
	for _, c := range creds {
		if c.Principal.Role != auth.RoleWorker {
			continue
		}
		seen[c.Name] = true
		if _, live := snap.Workers[c.Principal.Worker]; live || now.Sub(c.IssuedAt) < q.cfg.WorkerStartTimeout {
			delete(absent, c.Name)
			continue
		}
		since, ok := absent[c.Name]
		if !ok {
			absent[c.Name] = now
			continue
		}
		if now.Sub(since) >= absentFor {
			if err := q.authority.Revoke(c.Name); err == nil || errors.Is(err, auth.ErrUnknownCredential) {
				delete(absent, c.Name)
				q.log.Info().Str("credential", c.Name).Msg("revoked the credential of a worker gone for good")
			}
		}
	}
	for name := range absent {
		if !seen[name] {
			delete(absent, name)
		}
	}
}

// busTLS is the embedded bus's TLS configuration and the CA that verifies it:
// nil (plain TCP) on loopback unless Config.TLS asks; beyond loopback always,
// with a certificate for the listen and advertised hosts.
func (q *Queen) busTLS() (*tls.Config, string, error) {
	host, _, err := net.SplitHostPort(q.cfg.Listen)
	if q.cfg.Listen == "" || q.cfg.Listen == "-" || err != nil {
		host = "127.0.0.1"
	}
	if q.cfg.TLSCert != "" || q.cfg.TLSKey != "" {
		cert, err := tls.LoadX509KeyPair(q.cfg.TLSCert, q.cfg.TLSKey)
		if err != nil {
			return nil, "", fmt.Errorf("the bus's TLS certificate: %w", err)
		}
		return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, q.cfg.TLSCA, nil
	}
	if !q.cfg.TLS && bus.IsLoopback(host) {
		return nil, "", nil
	}
	hosts := []string{host}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		// Listening everywhere: the certificate names every address of
		// this machine and its host name.
		hosts = hosts[:0]
		if addrs, err := net.InterfaceAddrs(); err == nil {
			for _, a := range addrs {
				if n, ok := a.(*net.IPNet); ok {
					hosts = append(hosts, n.IP.String())
				}
			}
		}
		if h, err := os.Hostname(); err == nil {
			hosts = append(hosts, h)
		}
	}
	if u, err := url.Parse(q.cfg.AdvertiseURL); err == nil && u.Hostname() != "" {
		hosts = append(hosts, u.Hostname())
	}
	dir := TLSDir(q.cfg.DataDir)
	cfg, err := auth.ServerTLS(dir, hosts)
	if err != nil {
		return nil, "", fmt.Errorf("the bus's TLS certificate: %w", err)
	}
	return cfg, auth.CAFile(dir), nil
}
