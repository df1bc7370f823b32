package queen

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

const testLeaseTTL = 1500 * time.Millisecond

// leaseBucket is a leases bucket with the test TTL on a real server.
func leaseBucket(t *testing.T) jetstream.KeyValue {
	t.Helper()
	f := busfix.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, ttl, err := openLeaseBucket(ctx, f.Bus.JS, f.Bus.Space.LeasesBucket(), testLeaseTTL, 1, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, testLeaseTTL, ttl)
	return kv
}

// contender runs one queen's lease and records its terms.
type contender struct {
	lease  *Lease
	cancel context.CancelFunc
	done   chan struct{}
	// terms receives each term's epoch when it begins; ended each term's
	// epoch when its context ends.
	terms chan uint64
	ended chan uint64
}

func contend(t *testing.T, kv leaseKV, id string) *contender {
	t.Helper()
	c := &contender{lease: newLease(kv, subjects.SchedulerLease, id, testLeaseTTL, zerolog.Nop()),
		done: make(chan struct{}), terms: make(chan uint64, 16), ended: make(chan uint64, 16)}
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	go func() {
		defer close(c.done)
		c.lease.Run(ctx, func(ctx context.Context, epoch uint64) {
			c.terms <- epoch
			<-ctx.Done()
			c.ended <- epoch
		})
	}()
	t.Cleanup(c.stop)
	return c
}

func (c *contender) stop() {
	c.cancel()
	<-c.done
}

func awaitEpoch(t *testing.T, ch chan uint64, within time.Duration, what string) uint64 {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(within):
		t.Fatalf("%s: not within %s", what, within)
	}
	return 0
}

func requireNone(t *testing.T, ch chan uint64, what string) {
	t.Helper()
	select {
	case e := <-ch:
		t.Fatalf("%s (epoch %d)", what, e)
	default:
	}
}

// The first queen takes the lease and keeps it by renewing well past its
// TTL while a second stands by; when the first stops it releases the lease
// and the second leads at its next try, long before the TTL.
func TestLeaseIsRenewedAndReleasedOnStop(t *testing.T) {
	kv := leaseBucket(t)
	a := contend(t, kv, "queen-a")
	epochA := awaitEpoch(t, a.terms, 2*time.Second, "queen-a did not take a free lease")
	b := contend(t, kv, "queen-b")
	require.Eventually(t, func() bool { return b.lease.Leader() == "queen-a" }, 2*time.Second, 10*time.Millisecond, "the standby does not see who leads")

	// Renewals, observed as revisions, carry the lease past its TTL.
	took := time.Now()
	require.Eventually(t, func() bool {
		a.lease.mu.Lock()
		defer a.lease.mu.Unlock()
		return a.lease.rev >= epochA+4 && time.Since(took) > testLeaseTTL
	}, 10*time.Second, 10*time.Millisecond)
	requireNone(t, b.terms, "the standby led while the leader renewed")
	require.NoError(t, a.lease.Check(context.Background(), epochA))
	_, held := b.lease.Epoch()
	require.False(t, held)

	stopped := time.Now()
	a.stop()
	require.Equal(t, epochA, awaitEpoch(t, a.ended, time.Second, "the leader's term did not end with it"))
	awaitEpoch(t, b.terms, testLeaseTTL, "the standby did not take a released lease")
	require.Less(t, time.Since(stopped), testLeaseTTL/2, "a released lease is taken at the next try, not after the TTL")
	require.ErrorIs(t, a.lease.Check(context.Background(), epochA), ErrLeaseLost)
	require.Equal(t, "queen-b", b.lease.Leader())
}

// pausableKV stands for a queen that is stopped (SIGSTOP): while paused,
// its renewals block, deaf to their deadlines, until it is resumed.
type pausableKV struct {
	leaseKV
	mu      sync.Mutex
	resumed chan struct{} // nil while running
	// dropRelease makes a stop look like a crash: nothing is released.
	dropRelease atomic.Bool
}

func (p *pausableKV) pause() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resumed = make(chan struct{})
}

func (p *pausableKV) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.resumed != nil {
		close(p.resumed)
		p.resumed = nil
	}
}

func (p *pausableKV) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	p.mu.Lock()
	wait := p.resumed
	p.mu.Unlock()
	if wait != nil {
		<-wait
	}
	return p.leaseKV.Update(context.WithoutCancel(ctx), key, value, rev)
}

func (p *pausableKV) Delete(ctx context.Context, key string, opts ...jetstream.KVDeleteOpt) error {
	if p.dropRelease.Load() {
		return nil
	}
	return p.leaseKV.Delete(ctx, key, opts...)
}

// A leader that stops renewing (paused) loses the lease one TTL later: the
// standby takes over, and the old leader's checks refuse every effect, by
// its own clock and, were its clock to say otherwise, by the key. Resumed,
// its renewal fails the compare-and-swap: its term ends and it stands by.
func TestLeaseExpiresUnderAPausedLeaderAndFencesIt(t *testing.T) {
	kv := leaseBucket(t)
	paused := &pausableKV{leaseKV: kv}
	a := contend(t, paused, "queen-a")
	epochA := awaitEpoch(t, a.terms, 2*time.Second, "queen-a did not take a free lease")
	// queen-a's clock is switchable: frozen, it believes its last renewal
	// was just now.
	var frozen atomic.Pointer[time.Time]
	a.lease.mu.Lock()
	a.lease.now = func() time.Time {
		if f := frozen.Load(); f != nil {
			return *f
		}
		return time.Now()
	}
	a.lease.mu.Unlock()
	b := contend(t, kv, "queen-b")
	require.Eventually(t, func() bool { return b.lease.Leader() == "queen-a" }, 2*time.Second, 10*time.Millisecond)

	paused.pause()
	t.Cleanup(paused.resume)
	start := time.Now()
	epochB := awaitEpoch(t, b.terms, 3*testLeaseTTL, "the standby did not take over from a paused leader")
	// The key expires one TTL after the last renewal that landed, which
	// came at most TTL/3 before the pause; the standby tries every TTL/10
	// and the server expires keys about once a second.
	t.Logf("took over %s after the pause (TTL %s)", time.Since(start).Round(time.Millisecond), testLeaseTTL)
	require.Less(t, time.Since(start), testLeaseTTL+time.Second+testLeaseTTL/10)
	require.Greater(t, epochB, epochA)

	// Paused and past its TTL, queen-a's own clock refuses.
	err := a.lease.Check(context.Background(), epochA)
	require.ErrorIs(t, err, ErrLeaseLost)
	require.Contains(t, err.Error(), "last renewed")
	// Had its clock not noticed, the key names another queen.
	now := time.Now()
	frozen.Store(&now)
	a.lease.mu.Lock()
	a.lease.renewedAt = now
	a.lease.mu.Unlock()
	err = a.lease.Check(context.Background(), epochA)
	require.ErrorIs(t, err, ErrLeaseLost)
	require.Contains(t, err.Error(), `"queen-b" holds it`)
	frozen.Store(nil)
	requireNone(t, a.ended, "the paused leader's term ended while it could not run")

	// Resumed: the renewal at the old revision fails, the term ends, and
	// queen-a stands by behind queen-b.
	paused.resume()
	require.Equal(t, epochA, awaitEpoch(t, a.ended, 2*time.Second, "the resumed leader kept its term"))
	require.Eventually(t, func() bool { return a.lease.Leader() == "queen-b" }, 2*time.Second, 10*time.Millisecond)
	_, held := a.lease.Epoch()
	require.False(t, held)
	require.NoError(t, b.lease.Check(context.Background(), epochB))
	requireNone(t, a.terms, "the resumed queen took the lease back")
}

// A queen that dies holding the lease and starts again under the same
// identity takes its lease back at once; another identity waits for it to
// expire.
func TestLeaseIsReclaimedAtOnceBySameQueen(t *testing.T) {
	kv := leaseBucket(t)
	crashing := &pausableKV{leaseKV: kv}
	crashing.dropRelease.Store(true)
	first := contend(t, crashing, "queen-a")
	epoch1 := awaitEpoch(t, first.terms, 2*time.Second, "queen-a did not take a free lease")
	first.stop() // a crash: the key stays

	other := contend(t, kv, "queen-b")
	require.Eventually(t, func() bool { return other.lease.Leader() == "queen-a" }, 2*time.Second, 10*time.Millisecond)
	start := time.Now()
	again := contend(t, kv, "queen-a")
	epoch2 := awaitEpoch(t, again.terms, testLeaseTTL/2, "queen-a did not take back its own lease at once")
	require.Less(t, time.Since(start), testLeaseTTL/2)
	require.Greater(t, epoch2, epoch1)
	require.NoError(t, again.lease.Check(context.Background(), epoch2))
	// The old term, were it still running, is fenced by the new one.
	first.lease.mu.Lock()
	first.lease.term, first.lease.epoch, first.lease.renewedAt = "old", epoch1, time.Now()
	first.lease.mu.Unlock()
	require.ErrorIs(t, first.lease.Check(context.Background(), epoch1), ErrLeaseLost)
	requireNone(t, other.terms, "another queen took a lease its holder renewed")
}

// The identity a queen keeps in its data directory is the same on every
// start; one given explicitly must be a valid token.
func TestQueenIDIsKeptInTheDataDir(t *testing.T) {
	dir := t.TempDir()
	id, err := loadQueenID(dir, "")
	require.NoError(t, err)
	require.NoError(t, subjects.ValidateID(subjects.KindQueen, id))
	again, err := loadQueenID(dir, "")
	require.NoError(t, err)
	require.Equal(t, id, again)
	named, err := loadQueenID(dir, "q2")
	require.NoError(t, err)
	require.Equal(t, "q2", named)
	_, err = loadQueenID(dir, "a.b")
	require.ErrorIs(t, err, subjects.ErrInvalidID)
}

// A standby tries at TTL/10 ticks, at the moment the key it saw should
// expire, and every TTL/50 for a tick after it, while the server's age
// check catches up; a hint from a clock far off falls back to the ticks.
func TestStandbyWaitAimsAtTheKeysExpiry(t *testing.T) {
	const ttl = 3 * time.Second
	now := time.Now()
	for _, c := range []struct {
		name    string
		expires time.Time
		want    time.Duration
	}{
		{"no key seen", time.Time{}, 300 * time.Millisecond},
		{"expiry beyond a tick", now.Add(2 * time.Second), 300 * time.Millisecond},
		{"expiry within a tick", now.Add(120 * time.Millisecond), 120 * time.Millisecond},
		{"just expired", now, 60 * time.Millisecond},
		{"expired, the server not caught up", now.Add(-200 * time.Millisecond), 60 * time.Millisecond},
		{"expired over a tick ago", now.Add(-400 * time.Millisecond), 300 * time.Millisecond},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.Equal(t, c.want, standbyWait(ttl, now, c.expires))
		})
	}
}

// expiringKV holds another queen's lease key written at written: a Create
// fails until removed, when the server's age check takes the key away
// (after its expiry, as a real server's does).
type expiringKV struct {
	written, removed time.Time
	took             chan time.Time
}

func (k *expiringKV) Create(context.Context, string, []byte, ...jetstream.KVCreateOpt) (uint64, error) {
	if now := time.Now(); now.After(k.removed) {
		select {
		case k.took <- now: // the first take is the one measured
		default:
		}
		return 10, nil
	}
	return 0, jetstream.ErrKeyExists
}

func (k *expiringKV) Get(context.Context, string) (jetstream.KeyValueEntry, error) {
	return leaseEntry{value: []byte(`{"queen":"queen-a","term":"t"}`), created: k.written}, nil
}

func (k *expiringKV) Update(context.Context, string, []byte, uint64) (uint64, error) {
	return 0, jetstream.ErrKeyExists
}

func (k *expiringKV) Delete(context.Context, string, ...jetstream.KVDeleteOpt) error { return nil }

type leaseEntry struct {
	jetstream.KeyValueEntry
	value   []byte
	created time.Time
}

func (e leaseEntry) Value() []byte      { return e.value }
func (e leaseEntry) Created() time.Time { return e.created }
func (e leaseEntry) Revision() uint64   { return 5 }

// A standby takes a lease soon after the server removes it, not at its next
// tick: here the key expires 20 ms after the standby's third tick and goes
// 100 ms later, when a standby on ticks alone would take it 180 ms late.
func TestStandbyTakesTheLeaseAsItExpires(t *testing.T) {
	const ttl = 3 * time.Second
	start := time.Now()
	expires := start.Add(3*ttl/10 + 20*time.Millisecond)
	kv := &expiringKV{written: expires.Add(-ttl), removed: expires.Add(100 * time.Millisecond), took: make(chan time.Time, 1)}
	l := newLease(kv, subjects.SchedulerLease, "queen-b", ttl, zerolog.Nop())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Run(ctx, func(ctx context.Context, _ uint64) { <-ctx.Done() })
	}()
	defer func() { cancel(); <-done }()
	select {
	case took := <-kv.took:
		late := took.Sub(kv.removed)
		t.Logf("took the lease %s after the server removed it", late.Round(time.Millisecond))
		require.Less(t, late, 120*time.Millisecond, "the standby waited for its next tick")
	case <-time.After(2 * time.Second):
		t.Fatal("the standby never took the lease")
	}
}

// unreadableKV fails every read of the lease key while set, as a bus that
// cannot answer for a moment (a server restarting its JetStream).
type unreadableKV struct {
	leaseKV
	failing atomic.Bool
}

func (u *unreadableKV) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	if u.failing.Load() {
		return nil, nats.ErrTimeout
	}
	return u.leaseKV.Get(ctx, key)
}

// A leader's effect whose lease check cannot read the key is not dropped:
// Check refuses (the lease is not proven), but Await tries again while the
// queen's own clock holds the lease, and proves it once the key reads
// again. Before, the effect (a lost worker's job recovered) was refused
// and nobody decided that job again.
func TestAnEffectWaitsOutALeaseItCannotReadForAMoment(t *testing.T) {
	kv := &unreadableKV{leaseKV: leaseBucket(t)}
	a := contend(t, kv, "queen-a")
	epoch := awaitEpoch(t, a.terms, 2*time.Second, "queen-a did not take a free lease")

	kv.failing.Store(true)
	err := a.lease.Check(context.Background(), epoch)
	require.ErrorIs(t, err, ErrLeaseLost, "one check cannot prove the lease")
	time.AfterFunc(testLeaseTTL/5, func() { kv.failing.Store(false) })
	require.NoError(t, a.lease.Await(context.Background(), epoch), "the effect waits and proves it")
	requireNone(t, a.ended, "the term went on")
}
