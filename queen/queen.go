// Package queen is rbee's brain: it owns jobs, schedules inference, starts
// and stops hives, and serves the OpenAI-compatible gateway. It talks to
// everything else over the bus only.
package queen

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/queen/sched"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// Config is the queen's settings table: every knob, with its default.
type Config struct {
	// DataDir holds the embedded bus's JetStream files and hive logs.
	DataDir string
	// Listen is where the embedded bus accepts clients ("" = 127.0.0.1:4222).
	Listen string
	// NATSURL, when set, connects to an external NATS instead of embedding.
	NATSURL     string
	Credentials bus.Credentials
	// OpenBus turns the embedded bus's credentials and permissions off
	// (loopback only): every process on this machine may then do
	// anything on it. It exists to measure what security costs.
	OpenBus bool
	// TLS makes the embedded bus require TLS even on loopback; beyond
	// loopback it always does. The CA and certificate are made in
	// <data>/tls unless TLSCert and TLSKey name the user's own (TLSCA is
	// then the CA that signed them, handed to hives).
	TLS                    bool
	TLSCert, TLSKey, TLSCA string
	Namespace              string
	Retention              bus.Retention
	// JobTimeout fails a job that is not finished in time (default 30 min).
	JobTimeout time.Duration
	// HiveStartTimeout bounds waiting for a started hive to register (30 s).
	HiveStartTimeout time.Duration
	// HiveStopGrace is how long a stopping hive gets before SIGTERM, and
	// again before SIGKILL (10 s).
	HiveStopGrace time.Duration
	// WorkerStartTimeout bounds spawning a worker and loading its model (2 min).
	WorkerStartTimeout time.Duration
	// FirstTokenTimeout fails an inference whose worker sends no token in
	// time (default 60 s).
	FirstTokenTimeout time.Duration
	// MaxQueue bounds waiting inference requests per model (default 1024).
	MaxQueue int
	// WorkerSlots is the slot count of the workers the queen spawns for
	// inference requests; 0 lets each worker fit it to its memory.
	WorkerSlots int
	// LivenessGrace is how long after the queen starts, or its bus comes
	// back, an expired heartbeat is not taken for a loss: long enough for
	// every live hive and worker to beat again (default one heartbeat TTL).
	LivenessGrace time.Duration
	// AdvertiseURL is the bus address hives on other machines are told to
	// use (default: the embedded server's URL).
	AdvertiseURL string
	// BinDir holds rbee-hive and llm-worker-rbee for local hives (default:
	// the queen's own directory).
	BinDir string
	// HiveArgs are extra arguments for every locally started hive (tests).
	HiveArgs []string
	// GatewayAddr is the OpenAI-compatible HTTP address ("" = off,
	// default set by the command: 127.0.0.1:7833).
	// SSHConfigFile and SSHKnownHosts override ~/.ssh/config and
	// ~/.ssh/known_hosts for remote hives.
	SSHConfigFile string
	SSHKnownHosts string
	GatewayAddr   string
	APIKey        string
	// QueenID names this queen among several on one bus ("" = the id kept
	// in <data>/queen-id, made on first start), so a queen restarted on
	// the same data directory takes back its own lease at once.
	QueenID string
	// LeaseTTL is how long the scheduler lease outlives its holder's last
	// renewal: the longest a standby queen waits to take over from a
	// leader that died (DefaultLeaseTTL). The leases bucket keeps the TTL
	// of the queen that made it, and every queen on the bus uses that one.
	LeaseTTL time.Duration
	// LeaseReplicas is how many servers keep the leases bucket (default:
	// as many as keep the streams).
	LeaseReplicas int
	Log           zerolog.Logger
	// Ready, when set, is called once the queen serves requests.
	Ready func(*Queen)
}

// Defaults of the settings above.
const (
	DefaultJobTimeout         = 30 * time.Minute
	DefaultHiveStartTimeout   = 30 * time.Second
	DefaultHiveStopGrace      = 10 * time.Second
	DefaultWorkerStartTimeout = 2 * time.Minute
	DefaultFirstTokenTimeout  = 60 * time.Second
	DefaultMaxQueue           = 1024
)

func (c *Config) defaults() {
	if c.JobTimeout <= 0 {
		c.JobTimeout = DefaultJobTimeout
	}
	if c.HiveStartTimeout <= 0 {
		c.HiveStartTimeout = DefaultHiveStartTimeout
	}
	if c.HiveStopGrace <= 0 {
		c.HiveStopGrace = DefaultHiveStopGrace
	}
	if c.WorkerStartTimeout <= 0 {
		c.WorkerStartTimeout = DefaultWorkerStartTimeout
	}
	if c.FirstTokenTimeout <= 0 {
		c.FirstTokenTimeout = DefaultFirstTokenTimeout
	}
	if c.MaxQueue <= 0 {
		c.MaxQueue = DefaultMaxQueue
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.LivenessGrace <= 0 {
		c.LivenessGrace = bus.TTLForInterval(bus.DefaultHeartbeatInterval)
	}
	if c.BinDir == "" {
		if exe, err := os.Executable(); err == nil {
			c.BinDir = filepath.Dir(exe)
		}
	}
}

// Queen is a running queen.
type Queen struct {
	cfg       Config
	server    *bus.Server
	bus       *bus.Bus
	jobs      *jobs.Store
	inventory jetstream.KeyValue
	registry  *Registry
	narrator  *bus.Narrator
	endpoints *bus.Endpoints
	started   time.Time
	log       zerolog.Logger

	// runs tracks the queen-side goroutines of jobs, so shutdown waits.
	runs sync.WaitGroup
	// runCtx is cancelled at shutdown; every job goroutine derives from it.
	runCtx context.Context
	// busBack starts a grace after a reconnect (set once the registry
	// and scheduler exist; the connection calls it).
	busBack atomic.Pointer[func()]
	// local hive processes this queen started, by hive name.
	localHives sync.Map
	// authority checks every connection to the embedded bus (nil with an
	// external bus, or OpenBus); credsGone queues the credentials of
	// workers that are gone for revocation.
	authority *auth.Authority
	credsGone chan string
	// store holds the credentials the queen hands hives: the authority's,
	// or on an external bus the one `rbee creds` made (nil: none).
	store *auth.Store
	// caFile is the CA that signed the embedded bus's certificate ("" when
	// the bus speaks plain TCP on loopback).
	caFile  string
	gateway *gateway

	// id is this queen's identity on the bus; lease says whether it leads,
	// and term is its current term as the leader (nil while standing by).
	id    string
	lease *Lease
	term  atomic.Pointer[term]
	// firstTry closes once this queen has either led a first term through
	// its reconcile or found another queen leading, so it is ready to
	// serve as either.
	firstTry     chan struct{}
	firstTryOnce sync.Once
	// localOps are the queen-side operations this process runs (by job
	// id): reconcile must not fail them as left over by a dead queen.
	localOps sync.Map
}

// Run starts the queen and serves until ctx ends, then shuts down cleanly:
// stop taking requests, let in-flight ones answer, end its term as the
// leader (releasing the lease), stop job goroutines, close the bus (and the
// embedded server).
//
// Every queen on a bus answers the endpoints and serves the gateway; only
// the one that holds the scheduler lease runs the leader's duties (see
// lead), each time it takes the lease, through the same reconcile as a
// restart.
func Run(ctx context.Context, cfg Config) error {
	cfg.defaults()
	id, err := loadQueenID(cfg.DataDir, cfg.QueenID)
	if err != nil {
		return err
	}
	q := &Queen{cfg: cfg, started: time.Now().UTC(), log: cfg.Log.With().Str("queen", id).Logger(), id: id, firstTry: make(chan struct{})}
	if err := q.connect(ctx); err != nil {
		return err
	}
	defer q.closeBus()

	runCtx, cancelRuns := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRuns()
	q.runCtx = runCtx

	if err := q.setUpBus(ctx); err != nil {
		return err
	}
	setupCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	actor := api.Actor{Component: "queen"}
	if q.jobs, err = jobs.Open(setupCtx, q.bus, actor, cfg.Retention.JobEvents); err != nil {
		return err
	}
	if q.inventory, err = q.bus.KV(setupCtx, q.bus.Space.InventoryBucket()); err != nil {
		return err
	}
	q.narrator = q.bus.Narrator(actor, "", "")
	q.registry = newRegistry(q.bus, cfg.LivenessGrace)
	// Every queen watches the registry (its endpoints and gateway read
	// it); only the leader's scheduler hears of losses.
	q.registry.OnWorkerLost = func(id string, last api.WorkerStatus, why string) {
		if t := q.term.Load(); t != nil {
			t.sched.WorkerLost(last, why)
		}
		// A worker its hive saw exit is gone for good; one whose beats
		// stopped (paused, cut off) may come back, and keeps its key.
		if _, died := q.registry.Snapshot().Exited(id); died {
			q.workerGone(last)
		}
	}
	q.registry.OnWorkerGone = func(_ string, last api.WorkerStatus) {
		if t := q.term.Load(); t != nil {
			t.sched.WorkerGone(last)
		}
		q.workerGone(last)
	}
	q.registry.OnSettled = func() {
		if t := q.term.Load(); t != nil {
			t.sched.Settled(true)
		}
	}
	q.registry.OnFlush = func() {
		if t := q.term.Load(); t != nil {
			t.sched.ViewChanged()
		}
	}
	busBack := func() {
		if t := q.term.Load(); t != nil {
			t.sched.Settled(false)
		}
		q.registry.BusBack()
	}
	q.busBack.Store(&busBack)
	regDone := make(chan error, 1)
	go func() { regDone <- q.registry.run(runCtx) }()
	select {
	case <-q.registry.ready:
	case err := <-regDone:
		return fmt.Errorf("registry watch: %w", err)
	case <-setupCtx.Done():
		return fmt.Errorf("registry watch did not start: %w", setupCtx.Err())
	}

	leaseDone := make(chan struct{})
	go func() {
		defer close(leaseDone)
		q.lease.Run(runCtx, q.lead)
	}()
	defer func() { cancelRuns(); <-leaseDone }()
	// A queen that can lead at once (alone on the bus, or restarted within
	// its own lease) is ready once its first term has reconciled, as a
	// queen was before there were several.
	select {
	case <-q.firstTry:
	case <-setupCtx.Done():
		return fmt.Errorf("the first try for the scheduler lease did not end: %w", setupCtx.Err())
	}

	q.endpoints = bus.NewEndpoints(256, 30*time.Second)
	q.endpoints.Log = func(ep string, err error) { q.log.Error().Err(err).Str("endpoint", ep).Msg("request failed") }
	svc, err := q.addService()
	if err != nil {
		return err
	}
	// The endpoints' subscriptions are sent asynchronously: the server
	// must hold them before anyone is told the queen is ready, or a
	// client's first request finds no responder.
	if err := q.bus.NC.FlushWithContext(setupCtx); err != nil {
		_ = svc.Stop()
		return fmt.Errorf("queen endpoints: %w", err)
	}
	if cfg.GatewayAddr != "" {
		if q.gateway, err = startGateway(q, cfg.GatewayAddr); err != nil {
			_ = svc.Stop()
			return err
		}
	}
	role := "standby"
	if q.term.Load() != nil {
		role = "leader"
	}
	q.log.Info().Str("bus", q.BusURL()).Str("gateway", cfg.GatewayAddr).Str("version", version.Version).Str("role", role).Msg("queen ready")
	if cfg.Ready != nil {
		cfg.Ready(q)
	}

	<-ctx.Done()
	q.log.Info().Msg("queen shutting down")
	shutCtx, cancelShut := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancelShut()
	if q.gateway != nil {
		q.gateway.shutdown(shutCtx)
	}
	if err := svc.Stop(); err != nil {
		q.log.Warn().Err(err).Msg("stopping service")
	}
	if err := q.endpoints.Wait(shutCtx); err != nil {
		q.log.Warn().Msg("in-flight requests did not finish in time")
	}
	cancelRuns()
	done := make(chan struct{})
	go func() { <-leaseDone; q.runs.Wait(); close(done) }()
	select {
	case <-done:
	case <-shutCtx.Done():
		q.log.Warn().Msg("job goroutines did not stop in time")
	}
	return nil
}

// term is one tenure of this queen as the leader: the scheduler and what
// feeds it, the deadline keeper, and (with the embedded authority) the
// credential sweep. It begins when the queen takes the lease and ends when
// it loses it; epoch, the lease's revision when it began, tells the terms
// apart in logs.
type term struct {
	epoch     uint64
	sched     *sched.Scheduler
	deadlines *deadlineKeeper
}

// lead runs the leader's duties for one term, until ctx ends (the lease was
// lost, or the queen stops). A new term starts from the bus alone, as a
// restarted queen does: a fresh scheduler fed the job records from the
// start, deadlines armed from those records, waiting inferences queued
// again.
func (q *Queen) lead(ctx context.Context, epoch uint64) {
	t := &term{epoch: epoch}
	t.sched = q.newScheduler(t)
	t.deadlines = newDeadlineKeeper(q, t)
	log := q.log.With().Uint64("epoch", epoch).Logger()
	log.Info().Msg("leading: a scheduler term begins")
	var duties sync.WaitGroup
	duty := func(f func()) {
		duties.Add(1)
		go func() {
			defer duties.Done()
			f()
		}()
	}
	duty(func() { t.sched.Run(ctx) })
	duty(func() { t.deadlines.run(ctx) })
	if q.authority != nil {
		duty(func() { q.runCredentials(ctx) })
	}
	// Published before the grace can end, so the registry's OnSettled
	// reaches this scheduler; one that ended before is told once the
	// records are replayed (watchJobs).
	q.term.Store(t)
	// A term may begin while the bus cannot read (a cluster electing the
	// leaders whose election also cost the lease): reading the records is
	// tried again until it works or the term ends, since a scheduler that
	// never sees the records is blind.
	whileStarting := func(what string, read func() error) error {
		return bus.WhileStarting(ctx, func(err error, waited time.Duration) {
			log.Warn().Err(err).Dur("waited", waited).Msgf("%s: the bus cannot read now; trying again", what)
		}, read)
	}
	if err := whileStarting("reconciling jobs at the start of a term", func() error {
		rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		return q.reconcile(rctx, t)
	}); err != nil && ctx.Err() == nil {
		log.Warn().Err(err).Msg("reconciling jobs at the start of a term")
	}
	duty(func() {
		if err := whileStarting("watching job records", func() error { return q.watchJobs(ctx, t) }); err != nil && ctx.Err() == nil {
			log.Error().Err(err).Msg("watching job records")
		}
	})
	q.firstTryOnce.Do(func() { close(q.firstTry) })
	<-ctx.Done()
	q.term.CompareAndSwap(t, nil)
	duties.Wait()
	log.Info().Msg("the scheduler term ended")
}

// setUpBus creates the contract's streams and buckets and opens the
// scheduler lease's, waiting for a bus whose JetStream is still starting
// (a cluster electing its first leaders, a server coming up beside the
// queen under systemd) for as long as ctx lasts, rather than exiting on
// the first timeout.
func (q *Queen) setUpBus(ctx context.Context) error {
	return bus.WhileStarting(ctx, func(err error, waited time.Duration) {
		q.log.Warn().Err(err).Dur("waited", waited).Msg("the bus's JetStream does not answer yet; waiting for it")
	}, func() error {
		sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		if err := q.bus.EnsureStreams(sctx, q.cfg.Retention); err != nil {
			return err
		}
		lease, err := q.openLease(sctx)
		if err != nil {
			return err
		}
		q.lease = lease
		return nil
	})
}

// openLease opens this queen's side of the scheduler lease. A queen on its
// own embedded bus takes part too: it is alone there unless another queen
// is given a queen credential for that bus, and then the two must not both
// schedule. Alone, it takes the lease at its first try, and back its own
// at once after a restart.
func (q *Queen) openLease(ctx context.Context) (*Lease, error) {
	replicas := q.cfg.LeaseReplicas
	if replicas <= 0 {
		// As many copies as the streams: a lease must survive what they do.
		var err error
		if replicas, err = q.bus.Replicas(ctx); err != nil {
			return nil, err
		}
	}
	kv, ttl, err := openLeaseBucket(ctx, q.bus.JS, q.bus.Space.LeasesBucket(), q.cfg.LeaseTTL, replicas, q.log)
	if err != nil {
		return nil, err
	}
	l := newLease(kv, subjects.SchedulerLease, q.id, ttl, q.log)
	l.onStandby = func() { q.firstTryOnce.Do(func() { close(q.firstTry) }) }
	return l, nil
}

// ID is this queen's identity among the queens of its bus.
func (q *Queen) ID() string { return q.id }

// Leading reports whether this queen runs the scheduler now.
func (q *Queen) Leading() bool { return q.term.Load() != nil }

func (q *Queen) connect(ctx context.Context) error {
	cc := bus.ConnectConfig{
		Name: "queen-rbee", Namespace: q.cfg.Namespace, Credentials: q.cfg.Credentials,
		Reconnect: true, Log: q.log, Timeout: 5 * time.Second,
		OnReconnect: func() {
			if f := q.busBack.Load(); f != nil {
				(*f)()
			}
		},
	}
	if q.cfg.NATSURL != "" {
		cc.URL = q.cfg.NATSURL
		// Hives this queen starts verify the external bus with the same CA.
		q.caFile = cc.Credentials.CAFile
		q.store = q.externalStore()
		if q.store != nil && cc.Credentials.Empty() {
			// The queen's own key, which `rbee creds server-config` made
			// and the bus was configured with.
			if f := q.store.KeyFile(auth.QueenName); fileExists(f) {
				cc.Credentials.KeyFile = f
			}
		}
	} else {
		sc := bus.ServerConfig{DataDir: q.cfg.DataDir, Listen: q.cfg.Listen, Credentials: q.cfg.Credentials, Log: q.log}
		if host, _, err := net.SplitHostPort(q.cfg.Listen); q.cfg.OpenBus && err == nil && !bus.IsLoopback(host) {
			return fmt.Errorf("%w: --open-bus (no credentials, no permissions) is for loopback only, not %s", bus.ErrCredentialsRequired, q.cfg.Listen)
		}
		if !q.cfg.OpenBus {
			a, err := q.openAuthority()
			if err != nil {
				return err
			}
			q.authority, q.store, q.credsGone = a, a.Store(), make(chan string, 256)
			sc.Authority = a
			cc.Credentials = bus.Credentials{KeyFile: a.Store().KeyFile(auth.QueenName)}
		}
		tlsCfg, caFile, err := q.busTLS()
		if err != nil {
			return err
		}
		sc.TLS, q.caFile = tlsCfg, caFile
		cc.Credentials.CAFile = caFile
		srv, err := bus.StartServer(sc)
		if err != nil {
			return err
		}
		q.server = srv
		cc.Extra = srv.InProcessOptions()
	}
	b, err := bus.Connect(ctx, cc)
	if err != nil {
		if q.server != nil {
			q.server.Shutdown()
		}
		return err
	}
	q.bus = b
	return nil
}

func (q *Queen) closeBus() {
	q.bus.Close()
	if q.server != nil {
		q.server.Shutdown()
	}
}

// BusURL is the bus address clients and hives use.
func (q *Queen) BusURL() string {
	if q.cfg.AdvertiseURL != "" {
		return q.cfg.AdvertiseURL
	}
	if q.server != nil {
		return q.server.ClientURL()
	}
	return q.cfg.NATSURL
}

// localBusURL is the bus address for programs on this machine: BusURL,
// except that an embedded bus listening on every address is reached on
// loopback (0.0.0.0 is no address a certificate names).
func (q *Queen) localBusURL() string {
	if q.server == nil {
		return q.BusURL()
	}
	u, err := url.Parse(q.server.ClientURL())
	if err != nil {
		return q.BusURL()
	}
	if ip := net.ParseIP(u.Hostname()); ip != nil && ip.IsUnspecified() {
		u.Host = net.JoinHostPort("127.0.0.1", u.Port())
		return u.String()
	}
	return u.String()
}

// Bus is the queen's bus connection (for the gateway and tests).
func (q *Queen) Bus() *bus.Bus { return q.bus }

func (q *Queen) addService() (micro.Service, error) {
	svc, err := micro.AddService(q.bus.NC, micro.Config{
		Name:        q.bus.Space.QueenService(),
		Version:     version.Version,
		Description: "rbee queen: jobs, scheduling and hive lifecycle",
		QueueGroup:  q.bus.Space.QueenService(),
	})
	if err != nil {
		return nil, fmt.Errorf("start queen service: %w", err)
	}
	g := svc.AddGroup(q.bus.Space.QueenGroup())
	e := q.endpoints
	add := func(name string, h micro.Handler) error { return g.AddEndpoint(name, h) }
	errs := []error{
		add(api.EpSubmit, bus.Handler(e, api.EpSubmit, q.submit)),
		add(api.EpJobGet, bus.Handler(e, api.EpJobGet, q.jobGet)),
		add(api.EpJobList, bus.Handler(e, api.EpJobList, q.jobList)),
		add(api.EpJobCancel, bus.Handler(e, api.EpJobCancel, q.jobCancel)),
		add(api.EpStatus, bus.Handler(e, api.EpStatus, q.status)),
		add(api.EpHiveAdd, bus.Handler(e, api.EpHiveAdd, q.hiveAdd)),
		add(api.EpHiveRemove, bus.Handler(e, api.EpHiveRemove, q.hiveRemove)),
		add(api.EpHiveList, bus.Handler(e, api.EpHiveList, q.hiveList)),
		add(api.EpHiveGet, bus.Handler(e, api.EpHiveGet, q.hiveGet)),
		add(api.EpWorkerList, bus.Handler(e, api.EpWorkerList, q.workerList)),
		add(api.EpModelList, bus.Handler(e, api.EpModelList, q.modelList)),
	}
	if q.authority != nil {
		errs = append(errs, svc.AddEndpoint("worker-credentials", q.workerCredentialsHandler(),
			micro.WithEndpointSubject(q.bus.Space.WorkerCredentialsAll())))
	}
	if err := errors.Join(errs...); err != nil {
		_ = svc.Stop()
		return nil, err
	}
	return svc, nil
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
