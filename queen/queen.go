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
	caFile    string
	sched     *sched.Scheduler
	deadlines *deadlineKeeper
	gateway   *gateway
}

// Run starts the queen and serves until ctx ends, then shuts down cleanly:
// stop taking requests, let in-flight ones answer, stop job goroutines,
// close the bus (and the embedded server).
func Run(ctx context.Context, cfg Config) error {
	cfg.defaults()
	q := &Queen{cfg: cfg, started: time.Now().UTC(), log: cfg.Log}
	if err := q.connect(ctx); err != nil {
		return err
	}
	defer q.closeBus()

	runCtx, cancelRuns := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRuns()
	q.runCtx = runCtx

	setupCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := q.bus.EnsureStreams(setupCtx, cfg.Retention); err != nil {
		return err
	}
	var err error
	actor := api.Actor{Component: "queen"}
	if q.jobs, err = jobs.Open(setupCtx, q.bus, actor, cfg.Retention.JobEvents); err != nil {
		return err
	}
	if q.inventory, err = q.bus.KV(setupCtx, q.bus.Space.InventoryBucket()); err != nil {
		return err
	}
	q.narrator = q.bus.Narrator(actor, "", "")
	q.registry = newRegistry(q.bus, cfg.LivenessGrace)
	q.sched = q.newScheduler()
	q.registry.OnWorkerLost = func(id string, last api.WorkerStatus, why string) {
		q.sched.WorkerLost(last, why)
		// A worker its hive saw exit is gone for good; one whose beats
		// stopped (paused, cut off) may come back, and keeps its key.
		if _, died := q.registry.Snapshot().Exited(id); died {
			q.workerGone(last)
		}
	}
	q.registry.OnWorkerGone = func(_ string, last api.WorkerStatus) {
		q.sched.WorkerGone(last)
		q.workerGone(last)
	}
	q.registry.OnSettled = func() { q.sched.Settled(true) }
	q.registry.OnFlush = q.sched.ViewChanged
	busBack := func() {
		q.sched.Settled(false)
		q.registry.BusBack()
	}
	q.busBack.Store(&busBack)
	schedDone := make(chan struct{})
	go func() {
		defer close(schedDone)
		q.sched.Run(runCtx)
	}()
	defer func() { cancelRuns(); <-schedDone }()
	if q.authority != nil {
		q.runs.Add(1)
		go func() {
			defer q.runs.Done()
			q.runCredentials(runCtx)
		}()
	}
	regDone := make(chan error, 1)
	go func() { regDone <- q.registry.run(runCtx) }()
	select {
	case <-q.registry.ready:
	case err := <-regDone:
		return fmt.Errorf("registry watch: %w", err)
	case <-setupCtx.Done():
		return fmt.Errorf("registry watch did not start: %w", setupCtx.Err())
	}

	q.deadlines = newDeadlineKeeper(q)
	go q.deadlines.run(runCtx)
	if err := q.reconcile(setupCtx); err != nil {
		q.log.Warn().Err(err).Msg("reconciling jobs after start")
	}
	q.runs.Add(1)
	go func() {
		defer q.runs.Done()
		if err := q.watchJobs(runCtx); err != nil {
			q.log.Error().Err(err).Msg("watching job records")
		}
	}()

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
	q.log.Info().Str("bus", q.BusURL()).Str("gateway", cfg.GatewayAddr).Str("version", version.Version).Msg("queen ready")
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
	go func() { q.runs.Wait(); close(done) }()
	select {
	case <-done:
	case <-shutCtx.Done():
		q.log.Warn().Msg("job goroutines did not stop in time")
	}
	return nil
}

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
