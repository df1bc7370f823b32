// Package auth is who may do what on the rbee bus: the four roles and the
// NATS permissions each is granted, the credentials that prove a role (nkey
// pairs, issued and revoked by the queen's machine), the authority that
// checks them when a connection opens, and the TLS material for listeners
// beyond loopback.
//
// Permissions are built here and nowhere else, from the names package
// subjects builds, so that a subject's owner and its permission change
// together.
package auth

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// Role is what a credential may do on the bus.
type Role string

const (
	// RoleQueen runs the cluster: everything in its namespace and the
	// JetStream API of its streams and buckets.
	RoleQueen Role = "queen"
	// RoleClient is a person's keeper (or any tool they point at the
	// bus): call the queen, follow jobs, read records; write nothing.
	RoleClient Role = "client"
	// RoleHive is one hive: its own endpoints, its own heartbeat, its own
	// workers' registry keys and endpoints.
	RoleHive Role = "hive"
	// RoleWorker is one worker of one hive serving one model.
	RoleWorker Role = "worker"
)

// ParseRole reads a role as a person writes it.
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleQueen, RoleClient, RoleHive, RoleWorker:
		return r, nil
	}
	return "", fmt.Errorf("unknown role %q: use queen, client, hive or worker", s)
}

// Principal is who a credential speaks for: its role and the ids that scope
// it. Hive is set for hives and workers; Worker and ModelKey for workers.
type Principal struct {
	Role     Role   `json:"role"`
	Hive     string `json:"hive,omitempty"`
	Worker   string `json:"worker,omitempty"`
	ModelKey string `json:"model_key,omitempty"`
}

// Validate checks that the ids a role is scoped by are present and are
// safe subject tokens: a principal's ids become subjects in its
// permissions, so an id with a wildcard would widen them.
func (p Principal) Validate() error {
	switch p.Role {
	case RoleQueen, RoleClient:
		return nil
	case RoleHive:
		return subjects.ValidateID(subjects.KindHive, p.Hive)
	case RoleWorker:
		if err := subjects.ValidateID(subjects.KindHive, p.Hive); err != nil {
			return err
		}
		if err := subjects.ValidateID(subjects.KindWorker, p.Worker); err != nil {
			return err
		}
		return subjects.ValidateID(subjects.KindModelKey, p.ModelKey)
	}
	return fmt.Errorf("unknown role %q", p.Role)
}

// InboxPrefix is where a connection holding the key pub receives its
// replies. Each credential may subscribe to its own inboxes only, so a reply
// (a worker's credentials handed to its hive, a job record, a model list)
// reaches the one who asked and nobody else on the bus. Every program
// connects with this prefix; it is derived from the public key so that a
// program needs nothing but its key file to know it.
func InboxPrefix(pub string) string { return "_INBOX_" + pub }

// responses lets a service answer the requests it was sent, on whatever
// reply subject each names, without a publish permission on inboxes. The
// right to answer lasts as long as the longest request a service may take
// (a hive downloading a model answers when the download is done), and goes
// with the one answer.
var responses = &server.ResponsePermission{MaxMsgs: 1, Expires: ResponseWindow}

// ResponseWindow is how long after a request its answer is still let
// through.
const ResponseWindow = time.Hour

// Permissions are the subjects the holder of key pub, acting as p, may
// publish and subscribe to in space s.
func Permissions(s subjects.Space, p Principal, pub string) *server.Permissions {
	inbox := InboxPrefix(pub) + ".>"
	switch p.Role {
	case RoleQueen:
		pubs := []string{s.All(), "$SRV.>", "$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST"}
		for _, b := range buckets(s) {
			pubs = append(pubs, subjects.KVSubject(b, ">"))
		}
		subs := []string{s.All(), "$SRV.>", inbox}
		for _, st := range streams(s) {
			pubs = append(pubs, ownStream(st)...)
			// A cluster's leader elections: the registry judges no
			// expiry of the elections' making.
			subs = append(subs, subjects.LeaderElected(st))
		}
		return &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: pubs},
			Subscribe: &server.SubjectPermission{Allow: subs},
			Response:  responses,
		}
	case RoleClient:
		pubs := []string{s.QueenGroup() + ".>", "$SRV.>", "$JS.API.INFO"}
		for _, ep := range ClientHiveEndpoints {
			pubs = append(pubs, s.EveryHive(ep))
		}
		pubs = append(pubs, readStream(s.JobsStream())...)
		pubs = append(pubs, consumeStream(s.JobsStream())...)
		pubs = append(pubs, readStream(subjects.KVStream(s.JobsBucket()))...)
		return &server.Permissions{
			Publish: &server.SubjectPermission{Allow: pubs},
			// Reading everything in the namespace is what `nats sub
			// 'rbee.>'` needs; nothing secret travels there (credentials
			// go to their holder's own inbox).
			Subscribe: &server.SubjectPermission{Allow: []string{s.All(), inbox}},
		}
	case RoleHive:
		h := p.Hive
		hives, workers := s.HivesBucket(), s.WorkersBucket()
		// Its own workers' endpoints (a hive id is one token: the
		// principal was validated).
		hiveWorkers, _ := s.HiveWorkers(h)
		pubs := []string{
			subjects.KVSubject(hives, h),
			subjects.KVSubject(workers, subjects.WorkerKey(h, "*")),
			s.AllNarration(), s.ClusterNarration(),
			hiveWorkers,
			s.WorkerCredentials(h),
			"$SRV.>", "$JS.API.INFO",
		}
		pubs = append(pubs, readStream(subjects.KVStream(hives))...)
		pubs = append(pubs, readStream(subjects.KVStream(workers))...)
		group, _ := s.HiveGroup(h)
		return &server.Permissions{
			Publish: &server.SubjectPermission{Allow: pubs},
			Subscribe: &server.SubjectPermission{Allow: []string{group + ".>", s.EveryJobCancel(), "$SRV.>", inbox,
				// Its starting workers' first beats, as they are stored.
				subjects.KVSubject(workers, subjects.WorkerKey(h, "*"))}},
			Response: responses,
		}
	case RoleWorker:
		workers, jobsKV := s.WorkersBucket(), s.JobsBucket()
		pubs := append(jobEvents(s),
			subjects.KVSubject(workers, subjects.WorkerKey(p.Hive, p.Worker)),
			// Taking and finishing a job are compare-and-swap writes to
			// its record; see the README's security model.
			subjects.KVSubject(jobsKV, "*"),
			"$SRV.>", "$JS.API.INFO",
		)
		pubs = append(pubs, readStream(subjects.KVStream(workers))...)
		pubs = append(pubs, readStream(subjects.KVStream(jobsKV))...)
		pubs = append(pubs, readStream(s.InferStream())...)
		if cons, err := s.InferConsumer(p.ModelKey); err == nil {
			st := s.InferStream()
			pubs = append(pubs,
				"$JS.API.CONSUMER.CREATE."+st+"."+cons, "$JS.API.CONSUMER.CREATE."+st+"."+cons+".>",
				"$JS.API.CONSUMER.DURABLE.CREATE."+st+"."+cons, "$JS.API.CONSUMER.INFO."+st+"."+cons,
				"$JS.API.CONSUMER.MSG.NEXT."+st+"."+cons, "$JS.ACK."+st+"."+cons+".>")
		}
		group, _ := s.WorkerGroup(p.Hive, p.Worker)
		return &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: pubs},
			Subscribe: &server.SubjectPermission{Allow: []string{group + ".>", s.EveryJobCancel(), "$SRV.>", inbox}},
			Response:  responses,
		}
	}
	// An unknown role may do nothing at all.
	return &server.Permissions{
		Publish:   &server.SubjectPermission{Deny: []string{">"}},
		Subscribe: &server.SubjectPermission{Deny: []string{">"}},
	}
}

// ClientHiveEndpoints are the hive endpoints a client may call directly:
// reading a hive and managing its models. Starting and stopping workers and
// shutting a hive down go through the queen, which records them as jobs.
var ClientHiveEndpoints = []string{api.HiveEpCapabilities, api.HiveEpStatus, api.HiveEpModelList, api.HiveEpModelGet, api.HiveEpModelDelete, api.HiveEpModelSynth}

// jobEvents is publishing every kind of job event and the cluster's
// narration: what a worker does for the jobs it runs.
func jobEvents(s subjects.Space) []string {
	return append(s.JobsStreamSubjects(), s.ClusterNarration())
}

func streams(s subjects.Space) []string {
	out := []string{s.JobsStream(), s.InferStream(), s.RequestsStream()}
	for _, b := range buckets(s) {
		out = append(out, subjects.KVStream(b))
	}
	return out
}

func buckets(s subjects.Space) []string {
	// The leases bucket is the queens' alone: on a NATS several queens
	// share, they choose the one that schedules with it.
	return []string{s.HivesBucket(), s.WorkersBucket(), s.JobsBucket(), s.InventoryBucket(), s.LeasesBucket()}
}

// readStream is reading a stream's configuration and its messages by
// subject or sequence (what a KV Get does).
func readStream(st string) []string {
	return []string{"$JS.API.STREAM.INFO." + st, "$JS.API.STREAM.MSG.GET." + st, "$JS.API.DIRECT.GET." + st, "$JS.API.DIRECT.GET." + st + ".>"}
}

// consumeStream is creating and reading consumers of a stream (ordered
// consumers, KV watches), without deleting any: consumer names are single
// tokens, so a permission cannot tell one's own from another's, and an
// ephemeral consumer goes away by itself once nobody reads it.
func consumeStream(st string) []string {
	return []string{
		"$JS.API.CONSUMER.CREATE." + st, "$JS.API.CONSUMER.CREATE." + st + ".>",
		"$JS.API.CONSUMER.INFO." + st + ".*", "$JS.API.CONSUMER.MSG.NEXT." + st + ".*",
		"$JS.FC." + st + ".>",
	}
}

// ownStream is everything on one stream: what the queen, which creates and
// maintains the streams, may do.
func ownStream(st string) []string {
	return []string{
		"$JS.API.STREAM.*." + st, "$JS.API.STREAM.MSG.*." + st,
		"$JS.API.CONSUMER.*." + st, "$JS.API.CONSUMER.*." + st + ".>", "$JS.API.CONSUMER.DURABLE.CREATE." + st + ".>",
		"$JS.API.CONSUMER.MSG.NEXT." + st + ".*",
		"$JS.API.DIRECT.GET." + st, "$JS.API.DIRECT.GET." + st + ".>",
		"$JS.ACK." + st + ".>", "$JS.FC." + st + ".>",
	}
}
