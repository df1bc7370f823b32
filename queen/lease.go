package queen

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// Several queens may share one bus; exactly one of them leads, which means
// it runs the scheduler, the deadline keeper and reconcile (a "term"). The
// leader is whoever holds the scheduler lease: one key in the leases bucket,
// written by compare-and-swap, in a bucket whose MaxAge is the lease TTL. The
// holder rewrites the key every TTL/3, so a value that nobody renews is
// removed by the server one TTL after its last write, and a standby, which
// tries to create the key every TTL/10 and again right when the key it saw
// should expire, takes over.
//
// Fencing: a leader acts only while it holds the lease by its own monotonic
// clock (the last renewal that landed was sent less than a TTL ago: the
// server cannot have expired the key before then) and while the key still
// names this queen and this term (one Get before each effect; effects are
// rare). A paused leader wakes up with its clock past the TTL and its term
// gone from the key, so it acts on nothing, and its next renewal fails the
// compare-and-swap, which ends its term.

// DefaultLeaseTTL is how long a leader that stops renewing keeps the lease:
// the longest a standby waits to take over from a queen that died. Five
// seconds rides out a stalled bus or a GC pause of a few seconds, and keeps
// a failover short next to the time a model takes to load.
const DefaultLeaseTTL = 5 * time.Second

// ErrLeaseLost is returned by Lease.Check when this queen may not act as
// the leader: it does not hold the lease, its renewal is overdue, or the
// lease names another queen or another term.
var ErrLeaseLost = errors.New("this queen does not hold the scheduler lease")

// errLeaseUnread is a Check that could not read the key: the lease is not
// proven, but not known lost either (Await tries again).
var errLeaseUnread = errors.New("the lease key cannot be read now")

// leaseKV is what a lease needs of a KV bucket; jetstream.KeyValue has it,
// and tests wrap it to pause a queen.
type leaseKV interface {
	Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error)
	Update(ctx context.Context, key string, value []byte, revision uint64) (uint64, error)
	Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error)
	Delete(ctx context.Context, key string, opts ...jetstream.KVDeleteOpt) error
}

// leaseValue is what the lease key holds: who leads, and which of its terms
// (a new random token per acquisition, so a queen that lost the lease and
// took it again does not mistake its old term for its new one).
type leaseValue struct {
	Queen string    `json:"queen"`
	Term  string    `json:"term"`
	Since time.Time `json:"since"`
}

// Lease is one queen's side of the scheduler lease.
type Lease struct {
	kv     leaseKV
	key    string
	holder string
	ttl    time.Duration
	// now is the clock validity is judged by; time.Now carries the
	// monotonic reading, so a wall-clock step changes nothing.
	now func() time.Time
	log zerolog.Logger

	mu sync.Mutex
	// term is the token of the term held ("" while standing by); epoch
	// the key's revision when it began; rev the revision last written.
	term  string
	epoch uint64
	rev   uint64
	since time.Time
	// renewedAt is when the last write that landed was sent.
	renewedAt time.Time
	// leader is the queen the key named when last read ("" unknown).
	leader string
	// onStandby is called after each try to take the lease that failed.
	onStandby func()
}

// newLease is the lease of queen holder in kv under key, with the bucket's
// ttl. Its log lines are log's, which should name the queen.
func newLease(kv leaseKV, key, holder string, ttl time.Duration, log zerolog.Logger) *Lease {
	if ttl <= 0 {
		ttl = DefaultLeaseTTL
	}
	return &Lease{kv: kv, key: key, holder: holder, ttl: ttl, now: time.Now, log: log}
}

// Run keeps the lease until ctx ends: it tries to take it while standing by
// and renews it while leading. Each time it is taken, lead runs on a
// goroutine of its own with a context that ends when the lease is lost
// (or ctx ends); Run waits for lead to return before it tries again, so
// two terms of one queen never overlap. On the way out the lease is
// released (deleted at the revision last written), so a standby takes over
// at its next try instead of a TTL later.
func (l *Lease) Run(ctx context.Context, lead func(ctx context.Context, epoch uint64)) {
	var (
		cancelTerm context.CancelFunc
		termDone   chan struct{}
	)
	endTerm := func() {
		if cancelTerm != nil {
			cancelTerm()
			<-termDone
			cancelTerm = nil
		}
	}
	defer func() {
		endTerm()
		l.release()
	}()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		wait := l.ttl / 10
		if _, held := l.Epoch(); held {
			if l.renew(ctx) {
				wait = l.ttl / 3
			}
		} else if epoch, ok, expires := l.acquire(ctx); ok {
			cancelTerm, termDone = startTerm(ctx, epoch, lead)
			wait = l.ttl / 3
		} else {
			wait = standbyWait(l.ttl, l.now(), expires)
			if l.onStandby != nil {
				l.onStandby()
			}
		}
		if _, held := l.Epoch(); !held {
			endTerm()
		}
		timer.Reset(wait)
	}
}

// startTerm runs lead for a term on a goroutine of its own; cancel ends the
// term, done closes once lead has returned.
func startTerm(ctx context.Context, epoch uint64, lead func(context.Context, uint64)) (cancel context.CancelFunc, done chan struct{}) {
	tctx, cancel := context.WithCancel(ctx)
	done = make(chan struct{})
	go func() {
		defer close(done)
		lead(tctx, epoch)
	}()
	return cancel, done
}

// Epoch is the revision at which the current term began, and whether a term
// is held (by this queen's bookkeeping; Check asks the bus too).
func (l *Lease) Epoch() (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.epoch, l.term != ""
}

// Leader is the queen that leads as far as this one knows: itself while it
// holds the lease, else the holder the key named when last read ("" when
// none was seen).
func (l *Lease) Leader() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.term != "" {
		return l.holder
	}
	return l.leader
}

// Check returns nil only while this queen may act as the leader of term
// epoch: the lease is held by its own clock, and the key, read now, still
// names this queen and this term. Anything else, including a bus that
// cannot be read, is ErrLeaseLost: an effect that cannot prove the lease is
// not taken.
func (l *Lease) Check(ctx context.Context, epoch uint64) error {
	l.mu.Lock()
	term, held, renewed := l.term, l.epoch, l.renewedAt
	l.mu.Unlock()
	switch {
	case term == "" || held != epoch:
		return fmt.Errorf("%w (term %d is over)", ErrLeaseLost, epoch)
	case l.now().Sub(renewed) >= l.ttl:
		return fmt.Errorf("%w: last renewed %s ago, the lease lasts %s", ErrLeaseLost, l.now().Sub(renewed).Round(time.Millisecond), l.ttl)
	}
	ctx, cancel := context.WithTimeout(ctx, l.ttl/3)
	defer cancel()
	e, err := l.kv.Get(ctx, l.key)
	if err != nil {
		return fmt.Errorf("%w: %w: %v", ErrLeaseLost, errLeaseUnread, err)
	}
	var v leaseValue
	if err := json.Unmarshal(e.Value(), &v); err != nil || v.Queen != l.holder || v.Term != term {
		return fmt.Errorf("%w: queen %q holds it now", ErrLeaseLost, v.Queen)
	}
	return nil
}

// Await is Check tried again while the key cannot be read and this queen's
// clock still holds the lease: a leader's effect (the recovery of a job
// whose worker is gone, a spawn) waits to prove the lease rather than
// being dropped for one read that failed, which would leave its job as it
// was with nobody to decide it again. It ends within the lease's TTL at
// the latest: past it the clock refuses, and the term ends.
func (l *Lease) Await(ctx context.Context, epoch uint64) error {
	for {
		err := l.Check(ctx, epoch)
		if !errors.Is(err, errLeaseUnread) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(l.ttl / 20):
		}
	}
}

// standbyWait is how long a standby waits for its next try to take the
// lease, now, when the key it found should expire at expires (zero when it
// found none). It tries every TTL/10, and at the expiry itself rather than
// up to a tick after it. The server removes an expired key at its next age
// check, which runs up to 250 ms late by design (more on a busy machine), so
// for a tick past the expiry it tries every TTL/50. The expiry is the
// server's clock (the entry's write time) read on this one's: a hint for when
// to look, never a reason to act, so a skewed clock costs only the ticks'
// time it would have cost anyway.
func standbyWait(ttl time.Duration, now, expires time.Time) time.Duration {
	tick := ttl / 10
	if expires.IsZero() {
		return tick
	}
	switch until := expires.Sub(now); {
	case until >= tick:
		return tick
	case until > 0:
		return until
	case until > -tick:
		return ttl / 50
	default:
		return tick
	}
}

// acquire tries to take the lease: create the key, or, when it names this
// queen already (an earlier run of it that died or restarted within the
// TTL), take it over at its revision without waiting for it to expire.
// Not taken, expires is when the key another queen holds should expire by
// the server's clock, if it was read.
func (l *Lease) acquire(ctx context.Context) (epoch uint64, ok bool, expires time.Time) {
	term := newTerm()
	since := time.Now().UTC()
	data, _ := json.Marshal(leaseValue{Queen: l.holder, Term: term, Since: since})
	ctx, cancel := context.WithTimeout(ctx, l.ttl/3)
	defer cancel()
	sent := l.now()
	rev, err := l.kv.Create(ctx, l.key, data)
	if err == nil {
		l.hold(term, rev, rev, since, sent)
		l.log.Info().Uint64("epoch", rev).Msg("took the scheduler lease: this queen leads")
		return rev, true, time.Time{}
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		if ctx.Err() == nil {
			l.log.Debug().Err(err).Msg("taking the scheduler lease")
		}
		return 0, false, time.Time{}
	}
	e, err := l.kv.Get(ctx, l.key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, false, l.now() // it expired meanwhile: try again soon
	}
	if err != nil {
		return 0, false, time.Time{}
	}
	var cur leaseValue
	_ = json.Unmarshal(e.Value(), &cur)
	l.mu.Lock()
	l.leader = cur.Queen
	l.mu.Unlock()
	if cur.Queen != l.holder {
		return 0, false, e.Created().Add(l.ttl)
	}
	sent = l.now()
	rev, err = l.kv.Update(ctx, l.key, data, e.Revision())
	if err != nil {
		return 0, false, time.Time{}
	}
	l.hold(term, rev, rev, since, sent)
	l.log.Info().Uint64("epoch", rev).Msg("took back this queen's own scheduler lease: this queen leads")
	return rev, true, time.Time{}
}

func (l *Lease) hold(term string, epoch, rev uint64, since, sent time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.term, l.epoch, l.rev, l.since, l.renewedAt, l.leader = term, epoch, rev, since, sent, l.holder
}

// renew rewrites the key at the revision last written. It reports whether
// the renewal landed. A compare-and-swap that fails means the key moved on
// (it expired, another queen took it): the term is over. Any other error
// leaves the term to the local clock: held until a TTL after the last
// renewal that landed.
func (l *Lease) renew(ctx context.Context) bool {
	l.mu.Lock()
	term, rev, since := l.term, l.rev, l.since
	l.mu.Unlock()
	data, _ := json.Marshal(leaseValue{Queen: l.holder, Term: term, Since: since})
	rctx, cancel := context.WithTimeout(ctx, l.ttl/3)
	defer cancel()
	sent := l.now()
	next, err := l.kv.Update(rctx, l.key, data, rev)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.term != term {
		return false
	}
	switch {
	case err == nil:
		l.rev, l.renewedAt = next, sent
		return true
	case ctx.Err() != nil:
		return false
	case isRevisionConflict(err):
		l.log.Warn().Uint64("epoch", l.epoch).Msg("lost the scheduler lease (it expired or another queen took it): standing by")
		l.term, l.leader = "", ""
	case l.now().Sub(l.renewedAt) >= l.ttl:
		l.log.Warn().Err(err).Uint64("epoch", l.epoch).Msg("could not renew the scheduler lease within its TTL: standing by")
		l.term, l.leader = "", ""
	default:
		l.log.Debug().Err(err).Msg("renewing the scheduler lease")
	}
	return false
}

// release gives the lease up (if this queen still holds it), so a standby
// need not wait for it to expire.
func (l *Lease) release() {
	l.mu.Lock()
	term, rev := l.term, l.rev
	l.term = ""
	l.mu.Unlock()
	if term == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := l.kv.Delete(ctx, l.key, jetstream.LastRevision(rev)); err != nil {
		l.log.Debug().Err(err).Msg("releasing the scheduler lease")
		return
	}
	l.log.Info().Msg("released the scheduler lease")
}

// isRevisionConflict reports whether a compare-and-swap write failed because
// the key is not at the revision it expected (a single server says 10071,
// a replicated stream 10164).
func isRevisionConflict(err error) bool {
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return true
	}
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

func newTerm() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// openLeaseBucket opens the leases bucket, creating it with ttl as its
// MaxAge and the given replicas when it does not exist yet. Every queen on
// a bus must agree on the TTL, so the bucket's governs: a queen configured
// otherwise adopts it (and says so).
func openLeaseBucket(ctx context.Context, js jetstream.JetStream, bucket string, ttl time.Duration, replicas int, log zerolog.Logger) (jetstream.KeyValue, time.Duration, error) {
	if replicas < 1 {
		replicas = 1
	}
	// Each call bounded: one that reaches a bucket still electing its
	// leader is dropped, and the queen's setup tries again.
	lookup := func(ctx context.Context) (jetstream.KeyValue, error) { return js.KeyValue(ctx, bucket) }
	kv, err := bus.SetupCall(ctx, lookup)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = bus.SetupCall(ctx, func(ctx context.Context) (jetstream.KeyValue, error) {
			return js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
				Bucket:      bucket,
				Description: "who leads: the scheduler lease, renewed by its holder, expiring one TTL after its last renewal",
				History:     1,
				TTL:         ttl,
				Replicas:    replicas,
				Storage:     jetstream.FileStorage,
			})
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = bus.SetupCall(ctx, lookup) // another queen made it first
		}
	}
	if err != nil {
		return nil, 0, fmt.Errorf("open bucket %s: %w", bucket, err)
	}
	st, err := bus.SetupCall(ctx, kv.Status)
	if err != nil {
		return nil, 0, fmt.Errorf("read bucket %s: %w", bucket, err)
	}
	if got := st.TTL(); got > 0 && got != ttl {
		log.Warn().Dur("configured", ttl).Dur("bucket", got).Msg("the lease bucket was made with another lease TTL; using the bucket's, which every queen on this bus shares")
		ttl = got
	}
	// Who holds the lease is read from the leader: a follower's answer
	// may predate the last take or renewal.
	return bus.LeaderReads(js.Conn(), kv), ttl, nil
}

// queenIDFile holds a queen's identity in its data directory, so a queen
// restarted on the same directory is the same queen to the lease.
const queenIDFile = "queen-id"

// loadQueenID returns the queen's identity: id when set (checked as a
// subject token), else the one kept in dataDir, made on first start.
func loadQueenID(dataDir, id string) (string, error) {
	if id != "" {
		if err := subjects.ValidateID(subjects.KindQueen, id); err != nil {
			return "", fmt.Errorf("queen id: %w", err)
		}
		return id, nil
	}
	path := filepath.Join(dataDir, queenIDFile)
	if b, err := os.ReadFile(path); err == nil {
		if id := strings.TrimSpace(string(b)); subjects.ValidateID(subjects.KindQueen, id) == nil {
			return id, nil
		}
	}
	host, _ := os.Hostname()
	id = sanitizeID(host) + "-" + newTerm()[:8]
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return "", err
	}
	if err := os.WriteFile(path, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("keeping the queen's identity: %w", err)
	}
	return id, nil
}

// sanitizeID keeps the characters of s a subject token may hold.
func sanitizeID(s string) string {
	var b strings.Builder
	for _, c := range s {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' {
			b.WriteRune(c)
		}
		if b.Len() >= 32 {
			break
		}
	}
	if b.Len() == 0 {
		return "queen"
	}
	return b.String()
}
