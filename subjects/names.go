package subjects

import (
	"fmt"
	"strings"
)

// Space builds every name of one rbee cluster. The zero value is not usable;
// get one from New or Default.
type Space struct {
	ns string
}

// Default is the space of the default namespace "rbee".
func Default() Space { return Space{ns: DefaultNamespace} }

// New returns the space for namespace ns: 1-32 characters from [a-z0-9_-].
// Lower case only, because stream names are the upper-cased namespace and two
// namespaces must never map to one stream.
func New(ns string) (Space, error) {
	if ns == "" {
		return Default(), nil
	}
	if len(ns) > 32 {
		return Space{}, fmt.Errorf("%w: namespace %q is longer than 32 characters", ErrInvalidID, ns)
	}
	for i := 0; i < len(ns); i++ {
		c := ns[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return Space{}, fmt.Errorf("%w: namespace %q contains %q; only a-z 0-9 _ - are allowed", ErrInvalidID, ns, rune(c))
		}
	}
	return Space{ns: ns}, nil
}

// Namespace is the first token of every subject of this space.
func (s Space) Namespace() string { return s.ns }

// All matches every subject of this space (for tracing).
func (s Space) All() string { return s.ns + ".>" }

// --- request/reply services (nats micro) ---

// QueenService is the micro service name of the queen.
func (s Space) QueenService() string { return s.ns + "-queen" }

// HiveService is the micro service name every hive registers under; each hive
// is one instance, addressed through its own subject group.
func (s Space) HiveService() string { return s.ns + "-hive" }

// WorkerService is the micro service name of workers.
func (s Space) WorkerService() string { return s.ns + "-worker" }

// QueenGroup is the subject prefix of the queen's endpoints.
func (s Space) QueenGroup() string { return s.ns + ".queen" }

// Queen is the subject of one queen endpoint.
func (s Space) Queen(endpoint string) string { return s.QueenGroup() + "." + endpoint }

// HiveGroup is the subject prefix of one hive's endpoints.
func (s Space) HiveGroup(hive string) (string, error) {
	if err := ValidateID(KindHive, hive); err != nil {
		return "", err
	}
	return s.ns + ".hive." + hive, nil
}

// EveryHive matches one endpoint of every hive.
func (s Space) EveryHive(endpoint string) string { return s.ns + ".hive.*." + endpoint }

// Hive is the subject of one endpoint of one hive.
func (s Space) Hive(hive, endpoint string) (string, error) {
	g, err := s.HiveGroup(hive)
	if err != nil {
		return "", err
	}
	return g + "." + endpoint, nil
}

// WorkerGroup is the subject prefix of one worker's endpoints. The hive that
// owns the worker is a token of its own, so a hive's permissions can name
// its workers' endpoints (<ns>.worker.<hive>.>) and no other hive's.
func (s Space) WorkerGroup(hive, worker string) (string, error) {
	if err := ValidateID(KindHive, hive); err != nil {
		return "", err
	}
	if err := ValidateID(KindWorker, worker); err != nil {
		return "", err
	}
	return s.ns + ".worker." + hive + "." + worker, nil
}

// HiveWorkers matches every endpoint of every worker of one hive: what the
// hive may call, and what its workers serve.
func (s Space) HiveWorkers(hive string) (string, error) {
	if err := ValidateID(KindHive, hive); err != nil {
		return "", err
	}
	return s.ns + ".worker." + hive + ".*.>", nil
}

// Worker is the subject of one endpoint of one worker of a hive.
func (s Space) Worker(hive, worker, endpoint string) (string, error) {
	g, err := s.WorkerGroup(hive, worker)
	if err != nil {
		return "", err
	}
	return g + "." + endpoint, nil
}

// --- credentials ---

// WorkerCredentials is where hive asks the queen for the credentials of a
// worker it is about to start. Only that hive may publish here, so the
// subject itself says who asks; the answer goes to the hive's own inbox.
func (s Space) WorkerCredentials(hive string) string { return s.ns + ".creds.worker." + hive }

// WorkerCredentialsAll matches every hive's WorkerCredentials subject.
func (s Space) WorkerCredentialsAll() string { return s.ns + ".creds.worker.*" }

// --- inference work queue ---

// InferStream is the JetStream work-queue stream holding inference requests
// until a worker with a free slot pulls them.
func (s Space) InferStream() string { return strings.ToUpper(s.ns) + "_INFER" }

// InferAll matches the work queues of every model.
func (s Space) InferAll() string { return s.ns + ".infer.*" }

// Infer is the work-queue subject of one model key.
func (s Space) Infer(modelKey string) (string, error) {
	if err := ValidateID(KindModelKey, modelKey); err != nil {
		return "", err
	}
	return s.ns + ".infer." + modelKey, nil
}

// InferConsumer is the durable consumer shared by every worker of one model:
// they pull from it together, so each request goes to exactly one of them.
func (s Space) InferConsumer(modelKey string) (string, error) {
	if err := ValidateID(KindModelKey, modelKey); err != nil {
		return "", err
	}
	return "infer-" + modelKey, nil
}

// RequestsStream stores the whole request of each inference job once, so
// the job record keeps only an excerpt of the prompt and a retry or a
// restarted queen can queue the request again.
func (s Space) RequestsStream() string { return strings.ToUpper(s.ns) + "_REQUESTS" }

// RequestsAll matches every job's request subject.
func (s Space) RequestsAll() string { return s.ns + ".request.*" }

// Request is the subject holding one job's whole request.
func (s Space) Request(job string) (string, error) {
	if err := ValidateID(KindJob, job); err != nil {
		return "", err
	}
	return s.ns + ".request." + job, nil
}

// --- job events ---

// JobsStream is the stream that stores every job's narration, tokens and
// state changes, so any number of clients can follow, join late and resume.
func (s Space) JobsStream() string { return strings.ToUpper(s.ns) + "_JOBS" }

// JobsStreamSubjects are the subjects JobsStream captures. Cancel is left out
// on purpose: it is a core signal to whoever runs the job, not history.
func (s Space) JobsStreamSubjects() []string {
	return []string{s.EveryJob(EventNarration), s.EveryJob(EventToken), s.EveryJob(EventState)}
}

// EventKind is the last token of a job event subject.
type EventKind string

const (
	EventNarration EventKind = "narration"
	EventToken     EventKind = "token"
	EventState     EventKind = "state"
)

// JobEvent is the subject of one kind of event of one job.
func (s Space) JobEvent(job string, kind EventKind) (string, error) {
	if err := ValidateID(KindJob, job); err != nil {
		return "", err
	}
	switch kind {
	case EventNarration, EventToken, EventState:
	default:
		return "", fmt.Errorf("unknown job event kind %q", kind)
	}
	return s.ns + ".job." + job + "." + string(kind), nil
}

// EveryJob matches one kind of event of every job.
func (s Space) EveryJob(kind EventKind) string { return s.ns + ".job.*." + string(kind) }

// JobEvents matches every stored event of one job.
func (s Space) JobEvents(job string) (string, error) {
	if err := ValidateID(KindJob, job); err != nil {
		return "", err
	}
	return s.ns + ".job." + job + ".*", nil
}

// JobCancel is the core subject on which a job's cancellation is signalled to
// the worker running it.
func (s Space) JobCancel(job string) (string, error) {
	if err := ValidateID(KindJob, job); err != nil {
		return "", err
	}
	return s.ns + ".job." + job + ".cancel", nil
}

// EveryJobCancel matches the cancel signal of every job: what every worker
// listens to.
func (s Space) EveryJobCancel() string { return s.ns + ".job.*.cancel" }

// AllNarration matches the narration of every job.
func (s Space) AllNarration() string { return s.EveryJob(EventNarration) }

// ClusterNarration carries narration that belongs to no job (a hive lost, a
// worker exited). It is core pub/sub: live only, like a log tail.
func (s Space) ClusterNarration() string { return s.ns + ".cluster.narration" }

// JobIDFromSubject returns the job token of a job event subject.
func (s Space) JobIDFromSubject(subject string) (job string, kind EventKind, ok bool) {
	prefix := s.ns + ".job."
	if !strings.HasPrefix(subject, prefix) {
		return "", "", false
	}
	rest := strings.Split(subject[len(prefix):], ".")
	if len(rest) != 2 {
		return "", "", false
	}
	return rest[0], EventKind(rest[1]), true
}

// --- registry and records (JetStream KV) ---

// HivesBucket holds one heartbeat entry per live hive, each with a TTL that
// every beat refreshes; expiry means the hive is lost.
func (s Space) HivesBucket() string { return s.ns + "_hives" }

// WorkersBucket holds one heartbeat entry per live worker, under the key
// WorkerKey.
func (s Space) WorkersBucket() string { return s.ns + "_workers" }

// WorkerKey is a worker's key in WorkersBucket: <hive>.<worker>. The hive is
// a token of its own so that a hive may be allowed to write its own
// workers' keys ($KV.<bucket>.<hive>.*) and no other's.
func WorkerKey(hive, worker string) string { return hive + "." + worker }

// WorkerIDFromKey is the worker id of a WorkersBucket key (the key's last
// token; a key without a hive token is the id itself).
func WorkerIDFromKey(key string) string {
	if i := strings.LastIndexByte(key, '.'); i >= 0 {
		return key[i+1:]
	}
	return key
}

// JobsBucket holds job records, updated by compare-and-swap.
func (s Space) JobsBucket() string { return s.ns + "_jobs" }

// InventoryBucket holds the hives the user has added (name and how to reach
// the machine), so a restarted queen still knows them.
func (s Space) InventoryBucket() string { return s.ns + "_inventory" }

// LeasesBucket holds the leases that choose one queen among several for a
// duty only one may do at a time. Its MaxAge is the lease TTL: a lease its
// holder stops renewing expires by itself.
func (s Space) LeasesBucket() string { return s.ns + "_leases" }

// SchedulerLease is the key in LeasesBucket of the queen that leads: it runs
// the scheduler, the deadlines and reconcile.
const SchedulerLease = "scheduler"

// KVStream is the stream behind a KV bucket.
func KVStream(bucket string) string { return "KV_" + bucket }

// KVSubject is the subject a KV bucket stores key under. Heartbeats publish
// to it directly because a plain publish can carry a per-message TTL that
// refreshes on every beat, which kv.Put cannot.
func KVSubject(bucket, key string) string { return "$KV." + bucket + "." + key }
