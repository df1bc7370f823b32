package hive

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/internal/capabilities"
	"github.com/rbee-dev/rbee/internal/llamalib"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rs/zerolog"
)

// hive is one running hive. See the package comment for who owns what.
type hive struct {
	cfg      Config
	bus      *bus.Bus
	catalog  *catalog.Catalog
	narrator *bus.Narrator
	hb       *bus.Heartbeat
	// beat is hb for the bus's callbacks, which may run before it is made.
	beat atomic.Pointer[bus.Heartbeat]
	// leaf is the hive's own bus server when it joins through a leaf
	// connection (Config.Leaf); nil otherwise.
	leaf *leaf
	// workersKV is the workers registry: the hive reads its workers'
	// entries there and purges the entry of one that died.
	workersKV jetstream.KeyValue
	started   time.Time
	log       zerolog.Logger

	// kick asks the beat goroutine for an immediate beat (after a
	// reconnect, or when workers or models changed).
	kick chan struct{}
	// shutdown carries a shutdown request's job id from the endpoint to Run.
	shutdown chan string
	// stopCtx ends when the hive begins to stop (stopping): what rides out
	// a bus outage gives up soon after, so a stop is not held back by it.
	stopCtx  context.Context
	stopping context.CancelFunc

	mu      sync.Mutex
	caps    api.Capabilities
	models  []api.ModelBrief
	workers map[string]*workerProc
}

// Run starts the hive and serves until ctx ends or a shutdown request
// arrives, then shuts down: it narrates the shutdown, stops every worker
// (drain, then signals), leaves the registry at once, stops its service and
// closes the bus, and returns nil. It fails for a bad configuration, an
// unreachable bus, a registry or catalog it cannot use, or a live hive with
// the same id (an error wrapping bus.ErrDuplicate).
func Run(ctx context.Context, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	h := &hive{
		cfg: cfg, started: time.Now().UTC(),
		log:  cfg.Log.With().Str("hive", cfg.ID).Logger(),
		kick: make(chan struct{}, 1), shutdown: make(chan string, 1),
		workers: map[string]*workerProc{},
	}
	h.stopCtx, h.stopping = context.WithCancel(context.Background())
	defer h.stopping()
	for _, dir := range []string{cfg.DataDir, cfg.workersDir(), cfg.tmpDir()} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("hive %s: data directory: %w", cfg.ID, err)
		}
	}

	dctx, cancel := context.WithTimeout(ctx, 2*cfg.DetectTimeout)
	h.caps, err = capabilities.Detect(dctx, h.detectOptions()...)
	cancel()
	if err != nil {
		return fmt.Errorf("hive %s: detecting capabilities: %w", cfg.ID, err)
	}
	h.caps.RAMFree = h.capRAM(h.caps.RAMFree)

	var catOpts []catalog.Option
	if cfg.HubBase != "" {
		catOpts = append(catOpts, catalog.WithHubBase(cfg.HubBase))
	}
	if h.catalog, err = catalog.Open(cfg.modelsDir(), catOpts...); err != nil {
		return err
	}
	if err := h.refreshModels(); err != nil {
		return err
	}

	cc := bus.ConnectConfig{
		URL: cfg.NATSURL, Credentials: cfg.Credentials, Namespace: cfg.Namespace,
		Name: "rbee-hive " + cfg.ID, Reconnect: true, Extra: cfg.BusOptions, Log: h.log,
		// After a reconnect the registry may have lost the entry (a queen
		// restarted with a fresh bus); beat at once rather than wait.
		OnReconnect: h.rebeat,
	}
	if len(cfg.Leaf) > 0 {
		if h.leaf, err = startLeaf(ctx, cfg, h.log); err != nil {
			return err
		}
		// Deferred first, so it runs last: the hive's goodbye crosses it.
		defer h.leaf.Shutdown()
		// The hive talks through its own leaf, in process; its workers
		// get the leaf's loopback URL.
		h.cfg.NATSURL = h.leaf.URL()
		cc.URL, cc.Credentials = h.leaf.URL(), h.leaf.local
		cc.Extra = append(append([]nats.Option{}, cfg.BusOptions...), h.leaf.srv.InProcessOptions()...)
	}
	h.bus, err = bus.Connect(ctx, cc)
	if err != nil {
		return err
	}
	defer h.bus.Close()
	h.narrator = h.bus.Narrator(api.Actor{Component: "hive", ID: cfg.ID}, cfg.ID, "")

	// A stop asked for during the start (SIGTERM right after the entry
	// appeared) lets the start finish, boundedly, and then takes the one
	// shutdown path: cut off half-way, a registration whose write reached
	// the server would be reported as a failure and left to expire.
	setupCtx, cancelSetup := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancelSetup()
	if h.workersKV, err = h.bus.KV(setupCtx, h.bus.Space.WorkersBucket()); err != nil {
		return err
	}
	// Order matters. A registry entry tells the queen "call me", so the
	// service must be live (subscribed and flushed) before the first entry
	// is written. A namesake must never answer this hive's requests, so a
	// live entry is looked for first; Register then claims the entry
	// atomically and catches the rare namesake that started meanwhile.
	if err := h.refuseLiveNamesake(setupCtx); err != nil {
		return err
	}
	svc, eps, err := h.addService()
	if err == nil {
		if err = h.bus.NC.FlushTimeout(5 * time.Second); err != nil {
			_ = svc.Stop()
		}
	}
	if err != nil {
		return err
	}
	h.hb = h.bus.NewHeartbeat(h.bus.Space.HivesBucket(), cfg.ID, cfg.Heartbeat, h.beatValue)
	h.beat.Store(h.hb)
	if err := h.hb.Register(setupCtx); err != nil {
		_ = svc.Stop()
		if errors.Is(err, bus.ErrDuplicate) {
			return fmt.Errorf("hive %s is already registered by another live process; refusing to start a second one: %w", cfg.ID, err)
		}
		return fmt.Errorf("hive %s: registering: %w", cfg.ID, err)
	}
	cancelSetup()

	// The beat goroutines outlive ctx: they stop only after the workers,
	// so the registry shows the hive until it really leaves.
	beatCtx, stopBeats := context.WithCancel(context.WithoutCancel(ctx))
	var beats sync.WaitGroup
	lost := make(chan error, 1)
	refused := make(chan error, 1)
	if h.leaf != nil {
		// The hive's connection to its leaf never drops: the leaf's link
		// to the hub is what comes and goes, and its return is when the
		// registry must hear from this hive again.
		beats.Add(1)
		go func() {
			defer beats.Done()
			if err := h.leaf.watch(beatCtx, h.rebeat); err != nil {
				refused <- err
			}
		}()
	}
	beats.Add(2)
	go func() {
		defer beats.Done()
		err := h.hb.Run(beatCtx, func(err error) { h.log.Warn().Err(err).Msg("heartbeat failed") })
		if errors.Is(err, bus.ErrDuplicate) {
			lost <- err
		}
	}()
	go func() {
		defer beats.Done()
		h.kickLoop(beatCtx)
	}()
	leave := func() {
		stopBeats()
		beats.Wait()
		select {
		case err := <-lost:
			lost <- err
			return // the entry belongs to another process now
		default:
		}
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := h.hb.Deregister(dctx)
		if isWrongRevision(err) {
			// A beat cut off by stopBeats may have reached the server
			// without its acknowledgement reaching us, so the
			// heartbeat's revision is stale. One more beat re-reads the
			// entry (still ours: it was live a moment ago) and resyncs.
			if err = h.hb.Beat(dctx); err == nil {
				err = h.hb.Deregister(dctx)
			}
		}
		if err != nil {
			h.log.Warn().Err(err).Msg("leaving the registry")
		}
	}

	h.log.Info().Str("data", cfg.DataDir).Int("gpus", len(h.caps.GPUs)).Dur("heartbeat", cfg.Heartbeat).Msg("hive online")
	if cfg.Ready != nil {
		cfg.Ready()
	}

	var jobID string
	var runErr error
	select {
	case <-ctx.Done():
	case jobID = <-h.shutdown:
	case err := <-refused:
		// The hub refuses this hive's key now (revoked): it cannot be
		// itself on the bus any more, so it stops, as a hive whose own
		// connection is refused does.
		runErr = fmt.Errorf("hive %s: %w", cfg.ID, err)
	case err := <-lost:
		lost <- err // leave() looks too
		// Another process owns the entry now (this hive's entry expired
		// during a partition and a namesake took it): this hive is no
		// longer addressable as itself, so it stops.
		runErr = fmt.Errorf("hive %s: %w", cfg.ID, err)
	}
	h.stop(jobID, svc, eps, leave)
	return runErr
}

// stop is the one shutdown path: narrate, stop workers, leave the registry,
// stop the service.
func (h *hive) stop(jobID string, svc micro.Service, eps []*bus.Endpoints, leave func()) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*h.cfg.StopGrace+15*time.Second)
	defer cancel()
	h.log.Info().Msg("shutting down")
	h.stopping()
	if jobID != "" {
		h.narrator.Say(ctx, jobID, "shutdown", h.cfg.ID, "hive %s shutting down", h.cfg.ID)
	}
	h.narrator.Say(ctx, "", "shutdown", h.cfg.ID, "hive %s shutting down", h.cfg.ID)
	h.stopAllWorkers(ctx, jobID)
	leave()
	if err := svc.Stop(); err != nil {
		h.log.Warn().Err(err).Msg("stopping the service")
	}
	for _, e := range eps {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_ = e.Wait(wctx)
		cancel()
	}
	if jobID != "" {
		h.narrator.Say(ctx, jobID, "stopped", h.cfg.ID, "hive %s stopped", h.cfg.ID)
	}
	h.log.Info().Msg("hive stopped")
}

func isWrongRevision(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence
}

// refuseLiveNamesake fails with bus.ErrDuplicate while another process
// holds a live entry under this hive's id.
func (h *hive) refuseLiveNamesake(ctx context.Context) error {
	kv, err := h.bus.KV(ctx, h.bus.Space.HivesBucket())
	if err != nil {
		return err
	}
	e, err := kv.Get(ctx, h.cfg.ID)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("hive %s: reading the registry: %w", h.cfg.ID, err)
	}
	age := time.Since(e.Created()).Round(100 * time.Millisecond)
	return fmt.Errorf("hive %s is already registered by another live process (last beat %s ago); stop it first, or wait %s if it just died: %w",
		h.cfg.ID, age, bus.TTLForInterval(h.cfg.Heartbeat), bus.ErrDuplicate)
}

// rebeat beats at once after the bus came back (the connection, or the
// leaf's link to the hub): the beat in flight, sent on what dropped, is
// given up rather than waited for.
func (h *hive) rebeat() {
	if hb := h.beat.Load(); hb != nil {
		hb.Reconnected() // and its Run beats now
		return
	}
	h.kickBeat()
}

func (h *hive) kickBeat() {
	select {
	case h.kick <- struct{}{}:
	default: // a beat is already due
	}
}

// kickLoop beats whenever kicked. Beats from here and from Heartbeat.Run may
// cross; the loser's conditional publish fails and re-registers its own
// entry, so the entry stays consistent.
func (h *hive) kickLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.kick:
		}
		// Not cancelled by ctx: a publish cut off midway may still land
		// and leave the heartbeat's revision stale.
		bctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.cfg.Heartbeat+time.Second)
		if err := h.hb.Beat(bctx); err != nil && ctx.Err() == nil {
			h.log.Warn().Err(err).Msg("heartbeat failed")
		}
		cancel()
	}
}

// beatValue is the registry entry: everything the scheduler needs to place
// work here without asking.
func (h *hive) beatValue() ([]byte, error) {
	return json.Marshal(h.status(context.Background()))
}

func (h *hive) status(ctx context.Context) api.HiveStatus {
	free, err := capabilities.FreeMemory(ctx)
	h.mu.Lock()
	defer h.mu.Unlock()
	if err != nil {
		free = h.caps.RAMFree // the last detection's figure beats none
	}
	st := api.HiveStatus{
		ID: h.cfg.ID, Version: version.Version, PID: os.Getpid(),
		StartedAt: h.started, BeatAt: time.Now().UTC(),
		Capabilities: h.caps, RAMFree: h.capRAM(free),
		Workers: make([]string, 0, len(h.workers)),
		Models:  append([]api.ModelBrief{}, h.models...),
		LogPath: h.cfg.LogPath,
	}
	for id := range h.workers {
		st.Workers = append(st.Workers, id)
	}
	sort.Strings(st.Workers)
	return st
}

// ramFree is the RAM available for a new worker now.
func (h *hive) ramFree(ctx context.Context) (uint64, error) {
	free, err := capabilities.FreeMemory(ctx)
	if err != nil {
		return 0, err
	}
	return h.capRAM(free), nil
}

func (h *hive) capRAM(free uint64) uint64 {
	if h.cfg.RAMFreeCap > 0 && free > h.cfg.RAMFreeCap {
		return h.cfg.RAMFreeCap
	}
	return free
}

func (h *hive) detectOptions() []capabilities.Option {
	opts := []capabilities.Option{capabilities.WithTimeout(h.cfg.DetectTimeout), capabilities.WithCUDALibCheck(h.cudaLibs)}
	if h.cfg.NvidiaSMI != "" {
		opts = append(opts, capabilities.WithNvidiaSMI(h.cfg.NvidiaSMI))
	}
	return opts
}

// cudaLibs reports whether the llama libraries the workers will load are a
// CUDA build: without one a GPU is useless to them.
func (h *hive) cudaLibs() bool {
	dir, err := llamalib.Find(h.cfg.LlamaLib)
	if err != nil {
		return false
	}
	matches, _ := filepath.Glob(filepath.Join(dir, "*cuda*"))
	for _, m := range matches {
		if fi, err := os.Stat(m); err == nil && fi.Mode().IsRegular() {
			return true
		}
	}
	return false
}

// refreshModels re-reads the catalog summary the heartbeat carries.
func (h *hive) refreshModels() error {
	models, err := h.catalog.List()
	if err != nil {
		return err
	}
	briefs := make([]api.ModelBrief, 0, len(models))
	for _, m := range models {
		briefs = append(briefs, api.ModelBrief{ID: m.ID, Key: m.Key, EstimatedMemory: m.EstimatedMemory})
	}
	h.mu.Lock()
	h.models = briefs
	h.mu.Unlock()
	return nil
}

// addService serves the hive's endpoints as one instance of the hive
// service, under this hive's subject group.
func (h *hive) addService() (micro.Service, []*bus.Endpoints, error) {
	group, err := h.bus.Space.HiveGroup(h.cfg.ID)
	if err != nil {
		return nil, nil, err
	}
	logErr := func(ep string, err error) {
		if api.CodeOf(err) == CodeInsufficientMemory {
			// A refusal the caller is told about, not a hive fault.
			h.log.Warn().Err(err).Str("endpoint", ep).Msg("request refused")
			return
		}
		h.log.Error().Err(err).Str("endpoint", ep).Msg("request failed")
	}
	quick := bus.NewEndpoints(32, ShortRequestTimeout)
	quick.Log = logErr
	long := bus.NewEndpoints(16, LongRequestTimeout)
	long.Log = logErr
	svc, err := micro.AddService(h.bus.NC, micro.Config{
		Name:        h.bus.Space.HiveService(),
		Version:     version.Version,
		Description: "rbee hive: capabilities, model catalog and workers of one machine",
		Metadata:    map[string]string{"hive": h.cfg.ID, "hostname": h.caps.Hostname},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("start hive service: %w", err)
	}
	g := svc.AddGroup(group)
	err = errors.Join(
		g.AddEndpoint(api.HiveEpCapabilities, bus.Handler(quick, api.HiveEpCapabilities, h.capabilities)),
		g.AddEndpoint(api.HiveEpStatus, bus.Handler(quick, api.HiveEpStatus, func(ctx context.Context, _ struct{}) (api.HiveStatus, error) {
			return h.status(ctx), nil
		})),
		g.AddEndpoint(api.HiveEpShutdown, bus.Handler(quick, api.HiveEpShutdown, h.shutdownEndpoint)),
		g.AddEndpoint(api.HiveEpModelList, bus.Handler(quick, api.HiveEpModelList, h.modelList)),
		g.AddEndpoint(api.HiveEpModelGet, bus.Handler(quick, api.HiveEpModelGet, h.modelGet)),
		g.AddEndpoint(api.HiveEpModelDelete, bus.Handler(long, api.HiveEpModelDelete, h.modelDelete)),
		g.AddEndpoint(api.HiveEpModelAdd, bus.Handler(long, api.HiveEpModelAdd, h.modelAdd)),
		g.AddEndpoint(api.HiveEpModelSynth, bus.Handler(long, api.HiveEpModelSynth, h.modelSynth)),
		g.AddEndpoint(api.HiveEpWorkerSpawn, bus.Handler(long, api.HiveEpWorkerSpawn, h.workerSpawn)),
		g.AddEndpoint(api.HiveEpWorkerStop, bus.Handler(long, api.HiveEpWorkerStop, h.workerStop)),
		g.AddEndpoint(api.HiveEpWorkerList, bus.Handler(quick, api.HiveEpWorkerList, h.workerList)),
	)
	if err != nil {
		_ = svc.Stop()
		return nil, nil, fmt.Errorf("start hive service: %w", err)
	}
	return svc, []*bus.Endpoints{quick, long}, nil
}

// capabilities re-detects the machine (GPUs come and go, drivers recover)
// and beats at once, so the scheduler sees the new figures.
func (h *hive) capabilities(ctx context.Context, _ struct{}) (api.Capabilities, error) {
	dctx, cancel := context.WithTimeout(ctx, 2*h.cfg.DetectTimeout)
	defer cancel()
	caps, err := capabilities.Detect(dctx, h.detectOptions()...)
	if err != nil {
		return api.Capabilities{}, api.Errorf(api.CodeInternal, "hive %s: detecting capabilities: %v", h.cfg.ID, err)
	}
	caps.RAMFree = h.capRAM(caps.RAMFree)
	h.mu.Lock()
	h.caps = caps
	h.mu.Unlock()
	h.kickBeat()
	return caps, nil
}

// shutdownEndpoint answers at once; the shutdown itself runs in Run, which
// the caller watches through the registry entry leaving.
func (h *hive) shutdownEndpoint(_ context.Context, req api.ShutdownRequest) (struct{}, error) {
	if h.cfg.IgnoreShutdown {
		h.log.Warn().Msg("ignoring a shutdown request (--ignore-shutdown, a test hook)")
		return struct{}{}, nil
	}
	select {
	case h.shutdown <- req.JobID:
	default: // a shutdown is already under way
	}
	return struct{}{}, nil
}
