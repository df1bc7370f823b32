package queen

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
)

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
	if q.authority == nil {
		return "", nil
	}
	store := q.authority.Store()
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
// for those the registry reports, and every sweepEvery for any other
// worker credential whose worker has not been seen for longer than a
// worker may take to start.
func (q *Queen) runCredentials(ctx context.Context) {
	const sweepEvery = time.Minute
	go q.authority.Run(ctx, time.Second)
	t := time.NewTicker(sweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case name := <-q.credsGone:
			if err := q.authority.Revoke(name); err != nil && !errors.Is(err, auth.ErrUnknownCredential) {
				q.log.Warn().Err(err).Str("credential", name).Msg("revoking a gone worker's credential")
			}
		case <-t.C:
			q.sweepWorkerCredentials()
		}
	}
}

func (q *Queen) sweepWorkerCredentials() {
	snap := q.registry.Snapshot()
	if snap == nil || !q.registry.Settled() {
		return
	}
	creds, err := q.authority.Store().List()
	if err != nil {
		return
	}
	for _, c := range creds {
		if c.Principal.Role != auth.RoleWorker || time.Since(c.IssuedAt) < q.cfg.WorkerStartTimeout+time.Minute {
			continue
		}
		if _, live := snap.Workers[c.Principal.Worker]; live {
			continue
		}
		if err := q.authority.Revoke(c.Name); err == nil {
			q.log.Info().Str("credential", c.Name).Msg("revoked the credential of a worker that is gone")
		}
	}
}
