package worker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rbee-dev/rbee/worker/engine"
	"github.com/rs/zerolog"
)

// ErrStopped is the cause of a generation cut short because the worker shut
// down before the drain grace let it finish.
var ErrStopped = errors.New("worker stopped")

// worker is one running worker. The lifecycle (Run) owns the bus, the
// heartbeat, the model and the slot goroutines; the status counters are the
// only state shared with them, behind mu.
type worker struct {
	cfg Config
	log zerolog.Logger
	bus *bus.Bus
	key string
	hb  *bus.Heartbeat
	// beat is hb once registered, for the reconnect callback.
	beat     atomic.Pointer[bus.Heartbeat]
	model    engine.Model
	store    *jobs.Store
	narrator *bus.Narrator
	// consMu guards cons, which is made again if the bus loses it.
	consMu   sync.Mutex
	cons     jetstream.Consumer
	started  time.Time
	fileSize uint64
	// plan is the slot count, lanes and threads (planSlots); kvPerToken
	// the model's KV cache bytes per token.
	plan       slotPlan
	kvPerToken uint64

	// attempts is the job attempts this process's slots hold or ran.
	attempts attemptBook
	// cutoff ends stopWait after a stopping worker cancelled its jobs
	// (the drain grace ran out): no job waits for the bus beyond it. Set
	// by serve before the slots start.
	cutoff context.Context

	// drain carries a drain request's grace from the endpoint to Run.
	drain chan time.Duration

	// loaded is set once model is, for the endpoints (which are up
	// before the load).
	loaded atomic.Bool

	mu           sync.Mutex
	state        string
	ctxSize      int
	busy         int
	tokensServed uint64
	tokensPerSec float64
}

// Run serves cfg.Model until ctx ends or a drain request arrives, then
// drains: it stops taking work, lets in-flight jobs finish within the grace,
// cancels the rest, leaves the registry and returns nil. It returns an error
// for a bad configuration, an unreachable bus, a live worker with the same
// id, or a model that does not load (with the engine's reason).
func Run(ctx context.Context, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	w := &worker{
		cfg: cfg, started: time.Now().UTC(), state: api.WorkerLoading,
		drain: make(chan time.Duration, 1),
		log:   cfg.Log.With().Str("worker", cfg.ID).Str("model", cfg.Model).Logger(),
	}
	w.key, _ = subjects.ModelKey(cfg.Model)
	if st, err := os.Stat(cfg.ModelPath); err == nil {
		w.fileSize = uint64(st.Size())
	}
	// The slot count is settled before anything else, so a count that
	// does not fit is refused at once with its numbers.
	facts, err := gatherFacts(ctx, cfg)
	if err != nil {
		// A missing or unreadable model is the engine's to report when
		// it loads; without its dimensions only the default cap applies.
		facts = memoryFacts{Cores: runtime.NumCPU(), FreeIsUnknown: true}
	}
	w.plan, err = planSlots(cfg, facts)
	if err != nil {
		return fmt.Errorf("worker %s, model %s: %w", cfg.ID, cfg.Model, err)
	}
	w.cfg.Slots, w.cfg.Lanes, w.cfg.Threads = w.plan.Slots, w.plan.Lanes, w.plan.Threads
	w.kvPerToken = facts.KVPerToken

	w.bus, err = bus.Connect(ctx, bus.ConnectConfig{
		URL: cfg.NATSURL, Credentials: cfg.Credentials, Namespace: cfg.Namespace,
		Name: "llm-worker-rbee " + cfg.ID, Reconnect: true, Extra: cfg.BusOptions, Log: w.log,
		// Beat at once when the bus is back, well within the grace the
		// queen gives before it judges liveness, without waiting for a
		// beat the dropped connection took with it.
		OnReconnect: func() {
			if hb := w.beat.Load(); hb != nil {
				hb.Reconnected()
			}
		},
	})
	if err != nil {
		return err
	}
	defer w.bus.Close()
	w.narrator = w.bus.Narrator(api.Actor{Component: "worker", ID: cfg.ID}, cfg.Hive, cfg.ID)

	setupCtx, cancelSetup := context.WithTimeout(ctx, 10*time.Second)
	defer cancelSetup()
	if w.store, err = jobs.Open(setupCtx, w.bus, api.Actor{Component: "worker", ID: cfg.ID}, 0); err != nil {
		return err
	}

	// Registered before the load, so the hive and queen see it loading.
	w.hb = w.bus.NewHeartbeat(w.bus.Space.WorkersBucket(), subjects.WorkerKey(cfg.Hive, cfg.ID), cfg.Heartbeat, w.beatValue)
	if err := w.hb.Register(setupCtx); err != nil {
		return fmt.Errorf("worker %s: %w", cfg.ID, err)
	}
	w.beat.Store(w.hb)
	hbCtx, stopBeats := context.WithCancel(context.WithoutCancel(ctx))
	hbStopped := make(chan struct{})
	var hbErr error
	go func() {
		defer close(hbStopped)
		hbErr = w.hb.Run(hbCtx, func(err error) { w.log.Warn().Err(err).Msg("heartbeat failed") })
	}()
	leave := func() {
		stopBeats()
		<-hbStopped
		if errors.Is(hbErr, bus.ErrDuplicate) {
			return // the entry is another process's now
		}
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := w.hb.Deregister(dctx); err != nil {
			w.log.Warn().Err(err).Msg("leaving the registry")
		}
	}

	svc, endpoints, err := w.addService()
	if err != nil {
		leave()
		return err
	}
	stopService := func() {
		if err := svc.Stop(); err != nil {
			w.log.Warn().Err(err).Msg("stopping the service")
		}
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = endpoints.Wait(sctx)
	}

	slots, err := w.load(ctx)
	if err == nil {
		err = w.ensureConsumer(setupCtx)
	}
	if err != nil {
		stopService()
		leave()
		for _, s := range slots {
			_ = s.Close()
		}
		if w.model != nil {
			_ = w.model.Close()
		}
		return err
	}
	defer func() { _ = w.model.Close() }()

	err = w.serve(ctx, slots, hbStopped, func() error { return hbErr })

	w.narrator.Say(context.Background(), "", "leave", cfg.ID, "worker %s on hive %s stopped serving %s", cfg.ID, cfg.Hive, cfg.Model)
	stopService()
	leave()
	for _, s := range slots {
		_ = s.Close()
	}
	return err
}

// load loads the model and makes the slots.
func (w *worker) load(ctx context.Context) ([]engine.Slot, error) {
	eng := w.cfg.Engine
	if eng == nil {
		llama, err := engine.NewLlama(w.cfg.LlamaLib)
		if err != nil {
			return nil, err
		}
		eng = llama
	}
	t0 := time.Now()
	m, err := eng.Load(ctx, w.cfg.ModelPath, engine.LoadOptions{
		ContextSize: w.cfg.ContextSize, Slots: w.cfg.Slots, Lanes: w.cfg.Lanes, Threads: w.cfg.Threads, Device: w.cfg.Device,
		Resident: w.plan.Resident,
	})
	if err != nil {
		return nil, err
	}
	w.model = m
	w.loaded.Store(true)
	w.mu.Lock()
	w.ctxSize = m.ContextSize()
	w.mu.Unlock()
	var slots []engine.Slot
	for range w.cfg.Slots {
		s, err := m.NewSlot()
		if err != nil {
			return slots, fmt.Errorf("model %s: %w", w.cfg.Model, err)
		}
		slots = append(slots, s)
	}
	w.log.Info().Str("path", w.cfg.ModelPath).Str("device", w.cfg.Device).Int("slots", w.cfg.Slots).
		Int("lanes", w.cfg.Lanes).Int("threads_per_lane", w.cfg.Threads).Str("kv_per_slot", bytesHuman(w.plan.KVPerSlot)).
		Bool("weights_resident", w.plan.Resident).Int("ctx", m.ContextSize()).Dur("took", time.Since(t0)).Msg("model loaded")
	return slots, nil
}

// ensureConsumer creates (or finds) the durable consumer that every worker
// of this model pulls from together, so each request goes to exactly one.
func (w *worker) ensureConsumer(ctx context.Context) error {
	s := w.bus.Space
	name, err := s.InferConsumer(w.key)
	if err != nil {
		return err
	}
	filter, err := s.Infer(w.key)
	if err != nil {
		return err
	}
	cons, err := w.bus.JS.CreateOrUpdateConsumer(ctx, s.InferStream(), jetstream.ConsumerConfig{
		Durable:       name,
		Description:   "workers of model " + w.cfg.Model + " pull inference requests here",
		FilterSubject: filter,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       AckWait,
		MaxAckPending: -1,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("work queue %s of model %s: stream %s not found (is the queen running?): %w", name, w.cfg.Model, s.InferStream(), err)
	}
	if err != nil {
		return fmt.Errorf("work queue %s of model %s: %w", name, w.cfg.Model, err)
	}
	w.consMu.Lock()
	w.cons = cons
	w.consMu.Unlock()
	return nil
}

func (w *worker) consumer() jetstream.Consumer {
	w.consMu.Lock()
	defer w.consMu.Unlock()
	return w.cons
}

// serve runs the slots until ctx ends, a drain is requested or another
// process takes over the registry entry, then drains.
func (w *worker) serve(ctx context.Context, slots []engine.Slot, hbStopped <-chan struct{}, hbErr func() error) error {
	fetchCtx, stopFetching := context.WithCancel(context.Background())
	defer stopFetching()
	jobCtx, cancelJobs := context.WithCancelCause(context.Background())
	defer cancelJobs(nil)
	cutoff, cut := context.WithCancel(context.Background())
	defer cut()
	context.AfterFunc(jobCtx, func() { time.AfterFunc(stopWait, cut) })
	w.cutoff = cutoff

	var wg sync.WaitGroup
	for i, s := range slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.runSlot(fetchCtx, jobCtx, i, s)
		}()
	}
	w.setState(api.WorkerReady)
	w.beatNow()
	st := w.status()
	w.log.Info().Int("slots", len(slots)).Msg("worker ready")
	w.narrator.Say(context.Background(), "", "ready", w.cfg.ID, "worker %s on hive %s is ready with model %s", w.cfg.ID, w.cfg.Hive, w.cfg.Model)
	if w.cfg.Ready != nil {
		w.cfg.Ready(st)
	}

	grace := w.cfg.DrainGrace
	var fatal error
	select {
	case <-ctx.Done():
	case g := <-w.drain:
		grace = g
	case <-hbStopped:
		// Only ErrDuplicate ends the beat loop on its own: another
		// process owns this id now, so this one must not serve under it.
		fatal = fmt.Errorf("worker %s: %w", w.cfg.ID, hbErr())
		grace = 0
	}
	w.log.Info().Dur("grace", grace).Msg("draining")
	w.setState(api.WorkerDraining)
	if fatal == nil {
		w.beatNow()
	}
	stopFetching()

	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		w.log.Warn().Dur("grace", grace).Msg("in-flight jobs did not finish within the grace; cancelling them")
		cancelJobs(ErrStopped)
		<-done
	}
	return fatal
}

func (w *worker) beatNow() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := w.hb.Beat(ctx); err != nil {
		w.log.Warn().Err(err).Msg("heartbeat failed")
	}
}

func (w *worker) setState(s string) {
	w.mu.Lock()
	w.state = s
	w.mu.Unlock()
}

// slotTaken and slotFreed keep the busy count and the ready/busy state: a
// worker is busy when no slot is free.
func (w *worker) slotTaken() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.busy++
	if w.state == api.WorkerReady && w.busy >= w.cfg.Slots {
		w.state = api.WorkerBusy
	}
}

func (w *worker) slotFreed() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.busy--
	if w.state == api.WorkerBusy && w.busy < w.cfg.Slots {
		w.state = api.WorkerReady
	}
}

func (w *worker) tokenServed() {
	w.mu.Lock()
	w.tokensServed++
	w.mu.Unlock()
}

// tokensDropped uncounts n tokens of a generation whose job turned out
// not to be this worker's: they were made, but never sent.
func (w *worker) tokensDropped(n int) {
	w.mu.Lock()
	w.tokensServed -= uint64(n)
	w.mu.Unlock()
}

// jobSpeed folds one job's generation speed into the recent average.
func (w *worker) jobSpeed(tps float64) {
	if tps <= 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.tokensPerSec == 0 {
		w.tokensPerSec = tps
	} else {
		w.tokensPerSec = 0.7*w.tokensPerSec + 0.3*tps
	}
}

// status is what the heartbeat and the status endpoint report.
func (w *worker) status() api.WorkerStatus {
	// The time first, then the jobs: a job taken before BeatAt was
	// claimed before it (attemptBook), so it is listed.
	at := time.Now().UTC()
	held := w.attempts.jobs()
	w.mu.Lock()
	defer w.mu.Unlock()
	return api.WorkerStatus{
		ID: w.cfg.ID, Hive: w.cfg.Hive, Model: w.cfg.Model, ModelKey: w.key, Device: w.cfg.Device,
		SlotsTotal: w.cfg.Slots, SlotsBusy: w.busy, ContextSize: w.ctxSize, MemoryUsed: w.memoryUsed(),
		KVCacheBytes: uint64(w.cfg.Slots) * w.plan.KVPerSlot, KVUsedBytes: w.kvUsed(),
		State: w.state, TokensServed: w.tokensServed, TokensPerSec: w.tokensPerSec,
		PID: os.Getpid(), Version: version.Version, StartedAt: w.started, BeatAt: at, Jobs: held,
	}
}

func (w *worker) beatValue() ([]byte, error) { return json.Marshal(w.status()) }

// kvUsed is the KV cache the slots' sequences fill now, in bytes.
func (w *worker) kvUsed() uint64 {
	if !w.loaded.Load() {
		return 0
	}
	if r, ok := w.model.(engine.KVReporter); ok {
		return uint64(r.KVTokens()) * w.kvPerToken
	}
	return 0
}

// memoryUsed is the process's resident memory on the CPU, where the model
// lives in it; on a GPU the model file's size stands in for device memory.
func (w *worker) memoryUsed() uint64 {
	if w.cfg.Device == "cpu" {
		if rss := residentBytes(); rss > 0 {
			return rss
		}
	}
	return w.fileSize
}

// residentBytes reads VmRSS from /proc/self/status; 0 when unavailable.
func residentBytes() uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			fields := strings.Fields(rest)
			if len(fields) >= 1 {
				kb, err := strconv.ParseUint(fields[0], 10, 64)
				if err == nil {
					return kb * 1024
				}
			}
		}
	}
	return 0
}

// addService serves the worker's status and drain endpoints.
func (w *worker) addService() (micro.Service, *bus.Endpoints, error) {
	group, err := w.bus.Space.WorkerGroup(w.cfg.Hive, w.cfg.ID)
	if err != nil {
		return nil, nil, err
	}
	e := bus.NewEndpoints(16, 10*time.Second)
	e.Log = func(ep string, err error) { w.log.Error().Err(err).Str("endpoint", ep).Msg("request failed") }
	svc, err := micro.AddService(w.bus.NC, micro.Config{
		Name:        w.bus.Space.WorkerService(),
		Version:     version.Version,
		Description: "rbee worker: one loaded model",
		Metadata:    map[string]string{"worker": w.cfg.ID, "hive": w.cfg.Hive, "model": w.cfg.Model},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("start worker service: %w", err)
	}
	g := svc.AddGroup(group)
	err = errors.Join(
		g.AddEndpoint(EpStatus, bus.Handler(e, EpStatus, func(context.Context, struct{}) (api.WorkerStatus, error) {
			return w.status(), nil
		})),
		g.AddEndpoint(EpDrain, bus.Handler(e, EpDrain, w.drainEndpoint)),
		g.AddEndpoint(api.WorkerEpFit, bus.Handler(e, api.WorkerEpFit, w.fitEndpoint)),
	)
	if err != nil {
		_ = svc.Stop()
		return nil, nil, fmt.Errorf("start worker service: %w", err)
	}
	return svc, e, nil
}

// fitEndpoint measures a request as a job would be checked when this
// worker takes it (prepare), without running it.
func (w *worker) fitEndpoint(_ context.Context, a api.InferArgs) (api.FitReply, error) {
	if !w.loaded.Load() {
		return api.FitReply{}, api.Fail(api.ReasonUnavailable, "", "worker %s is still loading its model", w.cfg.ID)
	}
	_, n, err := w.prepare(a)
	if err != nil {
		return api.FitReply{}, paramError(err)
	}
	return api.FitReply{PromptTokens: n, ContextSize: w.model.ContextSize()}, nil
}

// drainEndpoint starts a drain and answers at once; the worker leaves the
// registry when it is done, which is how the caller sees the end.
func (w *worker) drainEndpoint(_ context.Context, req DrainRequest) (api.WorkerStatus, error) {
	grace := time.Duration(req.Grace)
	if grace < 0 {
		return api.WorkerStatus{}, api.Errorf(api.CodeBadRequest, "grace must not be negative, got %s", grace)
	}
	if grace == 0 {
		grace = w.cfg.DrainGrace
	}
	select {
	case w.drain <- grace:
	default: // a drain is already under way
	}
	st := w.status()
	st.State = api.WorkerDraining
	return st, nil
}
