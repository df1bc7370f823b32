package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/gguf"
	"github.com/rbee-dev/rbee/worker/engine"
)

const (
	// concSlots is the slot count of every model and worker of this
	// benchmark, and the highest concurrency it measures.
	concSlots = 8
	// concLargeCtx is the context of the 26 M model: the fairness row's
	// ~1,500-token prompt must fit.
	concLargeCtx = 2048
	// concMemCtx is the context of the memory-bound model. Its KV cache
	// is 64 KiB a token; 8 slots of 2048 would reserve 1 GiB per loaded
	// copy for prompts of a few dozen tokens.
	concMemCtx = 512
	concSeed   = 42
	// concLongTokens is the fairness row's long prompt, in tokens.
	concLongTokens = 1500
	// concFairTokens is what each request of the fairness row generates:
	// only its first token is measured.
	concFairTokens = 16
	// concFairGap is how long after the long request was queued the short
	// ones are submitted: long enough that the engine has handed the long
	// prompt to its lane (tokenising 1,500 tokens takes well under a
	// millisecond), so the short ones always arrive behind it.
	concFairGap = 5 * time.Millisecond
)

var concLevels = []int{1, 2, 4, 8}

// concPrompts are the distinct prompts of the concurrent requests: request
// i of a wave gets prompt i, the same on every way, so every way generates
// the same texts (up to the kernels, see the identity table). They are made
// of the generated vocabulary's words, so each is a handful of tokens.
var concPrompts = []string{
	"hello world, the bee is",
	"the bee and the world",
	"you and we are at the",
	"hi bee, it is on the",
	"in the world of the bee",
	"we hello the world and",
	"on the bee is a",
	"it is the world of you",
}

// concReq is one request of a wave.
type concReq struct {
	prompt string
	n      int
	temp   float32
	seed   uint32
	// queued, when set, is called once the request is on its way: the
	// engine's Generate is about to be called, or the queen answered the
	// job's submit.
	queued func()
}

// concRun is one request of a wave as its client saw it.
type concRun struct {
	arrivals []time.Time
	ids      []int32
	text     string
}

// concWay is one way of serving the concurrent requests. gen runs one
// request and returns when its last token arrived.
type concWay struct {
	name, short string
	gen         func(ctx context.Context, model string, r concReq) (concRun, error)
}

// wave is N requests submitted in one instant.
type wave struct {
	tokens int
	// perSec is all the wave's tokens over the time from the submission
	// to the last token of the last request.
	perSec float64
	ttfts  []time.Duration
	runs   []concRun
}

// runWave submits reqs at once on w and waits for all of them.
func runWave(ctx context.Context, w concWay, model string, reqs []concReq) (wave, error) {
	runs := make([]concRun, len(reqs))
	errs := make([]error, len(reqs))
	var wg sync.WaitGroup
	t0 := time.Now()
	for i, r := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runs[i], errs[i] = w.gen(ctx, model, r)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return wave{}, err
	}
	return summarizeWave(t0, runs)
}

func summarizeWave(t0 time.Time, runs []concRun) (wave, error) {
	wv := wave{runs: runs}
	var last time.Time
	for _, r := range runs {
		if len(r.arrivals) == 0 {
			return wave{}, errors.New("a request got no token")
		}
		wv.tokens += len(r.arrivals)
		wv.ttfts = append(wv.ttfts, r.arrivals[0].Sub(t0))
		if l := r.arrivals[len(r.arrivals)-1]; l.After(last) {
			last = l
		}
	}
	wv.perSec = float64(wv.tokens) / last.Sub(t0).Seconds()
	return wv, nil
}

// engineWay generates on an in-process model, one new slot per request, as
// a worker would.
func engineWay(name, short string, models map[string]engine.Model) concWay {
	return concWay{name, short, func(ctx context.Context, model string, r concReq) (concRun, error) {
		slot, err := models[model].NewSlot()
		if err != nil {
			return concRun{}, err
		}
		defer slot.Close()
		run := concRun{arrivals: make([]time.Time, 0, r.n), ids: make([]int32, 0, r.n)}
		var b strings.Builder
		if r.queued != nil {
			r.queued()
		}
		_, err = slot.Generate(ctx, engine.Request{Prompt: r.prompt, MaxTokens: r.n, Temperature: r.temp, Seed: r.seed}, func(t engine.Token) error {
			run.arrivals = append(run.arrivals, time.Now())
			run.ids = append(run.ids, t.ID)
			b.WriteString(t.Text)
			return nil
		})
		run.text = b.String()
		return run, err
	}}
}

// inferFollow is the keeper's path with a prompt of its own: an infer job
// submitted to the queen and its events followed until it ends.
func (c *cluster) inferFollow(ctx context.Context, model string, r concReq) (concRun, error) {
	seed := r.seed
	// Eight requests on one slot of the memory-bound model take minutes
	// on two cores if the worker does not batch.
	f, err := c.submitFollow(ctx, api.InferArgs{Model: model, Prompt: r.prompt, Sampling: api.Sampling{MaxTokens: r.n, Temperature: r.temp, Seed: &seed}}, 5*time.Minute, r.queued)
	run := concRun{arrivals: f.arrivals, ids: make([]int32, 0, len(f.tokens))}
	var b strings.Builder
	for _, t := range f.tokens {
		run.ids = append(run.ids, t.ID)
		b.WriteString(t.Text)
	}
	run.text = b.String()
	return run, err
}

// spawnWorkerSlots starts a worker for model on hive with slots slots and
// context ctxSize, leaving its threads (and how it spreads the slots over
// llama contexts) to the worker.
func (c *cluster) spawnWorkerSlots(ctx context.Context, hive, model string, slots, ctxSize int) (api.WorkerStatus, error) {
	return c.spawn(ctx, api.WorkerSpawnArgs{Hive: hive, Model: model, Slots: slots, Ctx: ctxSize, Device: "cpu"})
}

// concModel is one model of the benchmark and how hard it is measured.
type concModel struct {
	name, label string
	cfg         gguf.SynthConfig
	ctx         int
	n, rounds   int
	// budget bounds this model's rounds (at least one runs), so a slow
	// machine still ends the section in about ten minutes.
	budget time.Duration
	path   string
}

// benchConcurrency measures aggregate tokens/s and time to first token of
// 1 to 8 concurrent requests: the engine batching in-process (the limit),
// the engine as separate contexts (the old design) and a real worker
// through the keeper's path; then whether a long prompt holds short ones
// back, and whether batching changes outputs.
func benchConcurrency(ctx context.Context, e *env) (t *Table, err error) {
	cores := runtime.NumCPU()
	mem := gguf.MemoryBound()
	memParams := fmt.Sprintf("%.0f M", float64(mem.Params())/1e6)
	memSize := fmt.Sprintf("%.0f MB", float64(mem.TensorBytes())/1e6)
	models := []*concModel{
		{name: "large", label: "26 M (52 MB)", cfg: gguf.Large(), ctx: concLargeCtx, n: 128, rounds: 8, budget: 140 * time.Second},
		{name: "membound", label: fmt.Sprintf("%s (%s)", memParams, memSize), cfg: mem, ctx: concMemCtx, n: 32, rounds: 3, budget: 270 * time.Second},
	}
	fairRounds := 5
	// Warm-up waves, per way and model: the weights paged in, the batch
	// shapes of one and of every slot seen once.
	warmups := []int{concSlots, 1}
	if e.opts.Quick {
		models[0].n, models[0].rounds, models[0].budget = 32, 2, 30*time.Second
		models[1].n, models[1].rounds, models[1].budget = 8, 1, 45*time.Second
		fairRounds, warmups = 1, []int{1}
	}
	t = &Table{
		Intro: fmt.Sprintf("N = 1, 2, 4, 8 requests submitted in one instant, each with its own prompt (request i of a wave always gets prompt i), greedy (temperature 0), "+
			"%d tokens per request on the 26 M-parameter generated model (F16, context %d) and %d on the %s-parameter one (%s, %s, context %d: its weights do not fit in any CPU cache, so every decode step reads them from memory; a token takes about 40 ms on one core of this project's 2-core VM against 3 ms for the 26 M model, hence fewer tokens), "+
			"on a machine with %d cores. Four ways (six where Ollama is installed), all with %d slots, interleaved in rounds (order rotated per round, after warm-up waves of 4 tokens per way; up to %d rounds on the 26 M model and %d on the %s one, fewer where another round would take a model's rounds past %s and %s): "+
			"**a** the engine (worker/engine) in the bench process, one model loaded with Slots %d, Lanes 1 (one llama context decoding all sequences, each step in one pass or in the narrower ones the lane measured cheaper: README, \"Passes measured, not assumed\") and Threads %d (every core), and **a1** the same with Threads 1: the limit of batching; "+
			"**b** the engine as separate contexts, the old design: Slots %d, Lanes %d, Threads 1, one llama context per request, all decoding at once; "+
			"**c** rbee: an `infer` job per request, submitted to the queen on the bus and followed with bus.Follow as `rbee infer` does (the job named by the client and followed while it is submitted), run by a real llm-worker-rbee spawned with %d slots by a real rbee-hive (threads and lanes are the worker's choice); "+
			"**o** and **o1** the peer, where an `ollama` program is installed: Ollama serving the same file with as many parallel requests, through its OpenAI endpoint, with its own choice of threads and with 1. "+
			"**tokens/s** is the wave's aggregate: all tokens of its N requests over the time from the submission to the last token of the last request (median over rounds); "+
			"**TTFT** is from the submission to a request's first token, p50 and p99 over every request of every round; "+
			"**÷ best of a, b** is the row's tokens/s over the best of a, a1 and b at the same model and N; **÷ own at 1** is the row's tokens/s over the same way's at N = 1 (how it scales).",
			models[0].n, models[0].ctx, models[1].n, memParams, mem.WeightType(), memSize, models[1].ctx, cores, concSlots, models[0].rounds, models[1].rounds, memParams, models[0].budget, models[1].budget,
			concSlots, cores, concSlots, concSlots, concSlots),
		Header: []string{"model", "N", "way", "tokens/request", "tokens/s p50", "TTFT p50", "TTFT p99", "÷ best of a, b", "÷ own at 1"},
	}
	t.Notes = append(t.Notes, "a (Threads = every core) is at the mercy of anything else the machine runs: ggml's threads meet at a spinning barrier after every operation, so one thread descheduled stalls the whole step. "+
		"On this project's 2-core VM with other work running, a quick run put a at a twelfth of a1 on the 26 M model at N = 1 and at a sixth on the 412 M one at N = 8, and a probe of the same load options alone swung between 230 and 514 tokens/s from one minute to the next; a1 does not depend on it. Run this section on a quiet machine.")
	t.Notes = append(t.Notes, "Every way reads its weights into its own memory (resident, as a worker on a CPU loads them since 2026-12-07), from the same file of each model: the copy in the hive's catalog. Mapped weights, llama.cpp's default and the way of every run before, gave the 412 M model's first request a first token at 0.69 s p50 against 91 ms resident, and 19.6 against 43.0 tokens/s, on this project's VM in one run (docs/BENCHMARKS.md, \"Resident weights\"). Before that was known, two copies of the same bytes can decode at different speeds on a VM, by where their pages lie in its memory (on the AMD VM of this project, 2026-12-06: the 412 M model in-process at 33 against 53 tokens/s from two copies, the slow one as fast as the other once its pages were dropped and read again); before this, a, a1 and b read the bench's own file and c the hive's copy, and c ÷ best on the 412 M model read 0.47–0.56 in a run where the same ways on one file read 0.90–1.00.")
	// Targets this run could not get to are listed as not measured.
	defer func() {
		seen := map[string]bool{}
		for _, tg := range e.targets {
			if tg.Bench == 8 {
				seen[tg.Claim] = true
			}
		}
		why := "not measured"
		if err != nil {
			why = err.Error()
			if len(why) > 200 {
				why = why[:200] + "…"
			}
		}
		for _, claim := range concClaims(models) {
			if !seen[claim] {
				e.target(Target{Bench: 8, Claim: claim, Detail: why})
			}
		}
	}()

	llama, err := engine.NewLlama(e.libDir)
	if err != nil {
		return t, err
	}
	dir := e.dir("models")
	for _, m := range models {
		m.path = filepath.Join(dir, m.name+".gguf")
		t0 := time.Now()
		if err := gguf.SynthFile(m.path, m.cfg); err != nil {
			return t, err
		}
		e.logf("concurrency: generated %s in %s", m.name, time.Since(t0).Round(100*time.Millisecond))
	}
	// The cluster first: a queen, one hive holding both models, a warm
	// 8-slot worker per model.
	var cErr error
	var c *cluster
	var wayC concWay
	if c, _, err = e.startQueen(ctx, queenSpec{}); err != nil {
		cErr = err
	} else {
		defer c.close()
		cErr = func() error {
			if _, _, err := c.startHive(ctx, "local"); err != nil {
				return err
			}
			// The engine ways below read the hive's copies, the very
			// files its workers map: a model's pages in the page cache
			// are then the same for every way. Two copies of one model
			// can decode at different speeds on a VM (measured: 33
			// against 53 tokens/s on the 412 M model, in-process, the
			// same bytes in two files; the slow one was fast once its
			// pages were dropped and read again), so ways that read
			// different files would compare the machine's memory, not
			// the ways.
			for _, m := range models {
				path, err := c.addModel(ctx, "local", m.name, m.path)
				if err != nil {
					return err
				}
				m.path = path
			}
			return nil
		}()
	}
	// One loaded copy per way and model, each with its weights resident
	// as a worker on a CPU loads them (worker.slotPlan.Resident), and its
	// own KV cache.
	configs := []struct {
		short, name string
		opts        engine.LoadOptions
	}{
		{"a", fmt.Sprintf("a engine batched, %d threads", cores), engine.LoadOptions{Slots: concSlots, Lanes: 1, Threads: cores, Device: "cpu", Resident: true}},
		{"a1", "a1 engine batched, 1 thread", engine.LoadOptions{Slots: concSlots, Lanes: 1, Threads: 1, Device: "cpu", Resident: true}},
		{"b", "b separate contexts", engine.LoadOptions{Slots: concSlots, Lanes: concSlots, Threads: 1, Device: "cpu", Resident: true}},
	}
	loaded := map[string]map[string]engine.Model{} // way → model → loaded
	var ways []concWay
	for _, cf := range configs {
		loaded[cf.short] = map[string]engine.Model{}
		for _, m := range models {
			opts := cf.opts
			opts.ContextSize = m.ctx
			mdl, err := llama.Load(ctx, m.path, opts)
			if err != nil {
				return t, fmt.Errorf("loading %s for %s: %w", m.name, cf.short, err)
			}
			defer mdl.Close()
			loaded[cf.short][m.name] = mdl
		}
		ways = append(ways, engineWay(cf.name, cf.short, loaded[cf.short]))
	}
	if cErr == nil {
		for _, m := range models {
			if _, err := c.spawnWorkerSlots(ctx, "local", m.name, concSlots, m.ctx); err != nil {
				cErr = fmt.Errorf("spawning a %d-slot worker for %s: %w", concSlots, m.name, err)
				break
			}
		}
	}
	if cErr != nil {
		cErr = fmt.Errorf("c not measured: %w", cErr)
		e.logf("concurrency: %v", cErr)
	} else {
		wayC = concWay{fmt.Sprintf("c rbee (worker, %d slots)", concSlots), "c", c.inferFollow}
		ways = append(ways, wayC)
	}
	// o and o1, Ollama where installed: the same files, as many parallel
	// requests a model as c's slots; o with the threads Ollama chooses,
	// o1 with one, as a and a1. Flash attention off: Ollama's default
	// turns it on for these models, and at 8 parallel requests (a KV
	// cache of 8 contexts) it decoded the 26 M model 4–5 times slower on
	// this project's VM, by hand (2026-12-07).
	// Two servers: Ollama keeps one runner per model file, so two models
	// made from one file with different threads would reload it at
	// every request that switches between them.
	oErr, oVersion := errNoOllama, ""
	for _, pc := range []struct {
		short, label string
		threads      int
	}{{"o", "its threads", 0}, {"o1", "1 thread", 1}} {
		var pms []peerModel
		for _, m := range models {
			pms = append(pms, peerModel{name: m.name, path: m.path, ctx: m.ctx, threads: pc.threads})
		}
		pr, err := e.startPeer(ctx, concSlots, pms, "OLLAMA_FLASH_ATTENTION=0")
		if err != nil {
			oErr = err
			break
		}
		oErr, oVersion = nil, pr.version
		defer pr.proc.stop(3 * time.Second)
		ways = append(ways, peerConcWay(pr, pc.short, pc.label))
	}
	if oErr != nil {
		t.Notes = append(t.Notes, fmt.Sprintf("o and o1 (Ollama): not measured: %v.", oErr))
		ways = slices.DeleteFunc(ways, func(w concWay) bool { return strings.HasPrefix(w.short, "o") })
	} else {
		t.Notes = append(t.Notes, fmt.Sprintf("o and o1: Ollama %s, two servers (`ollama serve`, started by the bench with OLLAMA_NUM_PARALLEL=%d, OLLAMA_FLASH_ATTENTION=0 and every model kept loaded), each model created from the same file as the other ways' with the same context: for o with the threads Ollama chooses, for o1 with num_thread 1. Requests go to its `POST /v1/completions` with stream: true, read by table 1's SSE client. "+
			"Flash attention is off because Ollama's default turned it on for these models and, at 8 parallel requests, decoded the 26 M model 4–5 times slower on this project's VM (by hand, 2026-12-07: 69–84 against 219–351 tokens/s at N = 1).", oVersion, concSlots))
	}

	reqs := func(n, count int) []concReq {
		rs := make([]concReq, count)
		for i := range rs {
			rs[i] = concReq{prompt: concPrompts[i%len(concPrompts)], n: n, seed: concSeed}
		}
		return rs
	}
	type key struct {
		model, way string
		n          int
	}
	waves := map[key][]wave{}
	var errs []string
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Sprintf(format, args...))
	}
	for _, m := range models {
		for _, w := range ways {
			for _, n := range warmups {
				if _, err := runWave(ctx, w, m.name, reqs(4, n)); err != nil {
					fail("%s, %s, warm-up: %v", m.name, w.short, err)
				}
			}
		}
		t0 := time.Now()
		r := 0
		// A round starts only if, as long as the average so far, it ends
		// within the budget.
		for ; r < m.rounds && ctx.Err() == nil && (r == 0 || time.Since(t0)+time.Since(t0)/time.Duration(r) <= m.budget); r++ {
			for li, n := range concLevels {
				for i := range ways {
					w := ways[(i+r+li)%len(ways)]
					wv, err := runWave(ctx, w, m.name, reqs(m.n, n))
					if err != nil {
						fail("%s, %s, N=%d: %v", m.name, w.short, n, err)
						continue
					}
					waves[key{m.name, w.short, n}] = append(waves[key{m.name, w.short, n}], wv)
				}
			}
			e.logf("concurrency: %s round %d done (%s)", m.name, r+1, time.Since(t0).Round(100*time.Millisecond))
		}
		if r < m.rounds && ctx.Err() == nil {
			t.Notes = append(t.Notes, fmt.Sprintf("%s model: %d of %d rounds; another would have taken its rounds past %s.", m.label, r, m.rounds, m.budget))
		}
	}

	perSec := func(k key) float64 {
		var s sample
		for _, wv := range waves[k] {
			s = append(s, wv.perSec)
		}
		return s.p50()
	}
	for _, m := range models {
		var ratios []string
		allHold, measured := true, true
		for _, n := range concLevels {
			best := math.NaN()
			for _, cf := range configs {
				if v := perSec(key{m.name, cf.short, n}); !math.IsNaN(v) && (math.IsNaN(best) || v > best) {
					best = v
				}
			}
			for _, w := range ways {
				k := key{m.name, w.short, n}
				ws := waves[k]
				if len(ws) == 0 {
					t.Rows = append(t.Rows, []string{m.label, fmt.Sprint(n), w.name, "—", "not measured"})
					continue
				}
				var ttft, toks sample
				for _, wv := range ws {
					ttft = append(ttft, durations(wv.ttfts)...)
					toks = append(toks, float64(wv.tokens)/float64(n))
				}
				v := perSec(k)
				t.Rows = append(t.Rows, []string{m.label, fmt.Sprint(n), w.name, fmt.Sprintf("%.0f", toks.p50()), num(v), ms(ttft.p50()), ms(ttft.p99()),
					ratio(v, best), ratio(v, perSec(key{m.name, w.short, 1}))})
			}
			cv := perSec(key{m.name, "c", n})
			if math.IsNaN(cv) || math.IsNaN(best) {
				measured = false
				ratios = append(ratios, fmt.Sprintf("N=%d: —", n))
				continue
			}
			allHold = allHold && cv >= 0.9*best
			ratios = append(ratios, fmt.Sprintf("N=%d: %.3f", n, cv/best))
		}
		claims := concClaims(models)
		tg := Target{Bench: 8, Claim: claims[slices.Index(models, m)], Detail: "c ÷ best of a, a1, b: " + strings.Join(ratios, ", ")}
		if measured {
			tg.Holds = holds(allHold)
		}
		e.target(tg)
	}
	for i, m := range models {
		tg := Target{Bench: 8, Claim: concClaims(models)[3+i]}
		if oErr != nil {
			tg.Detail = "not measured: " + oErr.Error()
			e.target(tg)
			continue
		}
		var ratios []string
		allHold, measured := true, true
		for _, n := range concLevels {
			cv, ov := perSec(key{m.name, "c", n}), math.Max(perSec(key{m.name, "o", n}), perSec(key{m.name, "o1", n}))
			if math.IsNaN(cv) || math.IsNaN(ov) {
				measured = false
				ratios = append(ratios, fmt.Sprintf("N=%d: —", n))
				continue
			}
			allHold = allHold && cv >= ov
			ratios = append(ratios, fmt.Sprintf("N=%d: %.2f", n, cv/ov))
		}
		tg.Detail = "c ÷ better of o, o1 tokens/s: " + strings.Join(ratios, ", ")
		if measured {
			tg.Holds = holds(allHold)
		}
		e.target(tg)
	}
	if c1, c8 := perSec(key{models[1].name, "c", 1}), perSec(key{models[1].name, "c", concSlots}); !math.IsNaN(c1) && !math.IsNaN(c8) {
		e.target(Target{Bench: 8, Claim: concClaims(models)[2], Holds: holds(c8 >= 2.5*c1),
			Detail: fmt.Sprintf("%s vs %s tokens/s = %.2f× (a: %.2f×, a1: %.2f×, b: %.2f×)", num(c8), num(c1), c8/c1,
				perSec(key{models[1].name, "a", concSlots})/perSec(key{models[1].name, "a", 1}),
				perSec(key{models[1].name, "a1", concSlots})/perSec(key{models[1].name, "a1", 1}),
				perSec(key{models[1].name, "b", concSlots})/perSec(key{models[1].name, "b", 1}))})
	}

	// Fairness: one long prompt submitted with four short requests.
	fairWays := []concWay{ways[0]}
	if cErr == nil {
		fairWays = append(fairWays, wayC)
	}
	fair, ferr := concFairness(ctx, e, loaded["a"][models[0].name], fairWays, models[0], fairRounds)
	if ferr != nil {
		fail("fairness: %v", ferr)
	}
	t.More = append(t.More, fair)

	// Identity: each request alone, then all at once.
	ident, ierr := concIdentity(ctx, []concWay{ways[0], ways[2]}, models[0], reqs)
	if ierr != nil {
		fail("identity: %v", ierr)
	}
	t.More = append(t.More, ident)

	if len(errs) > 0 {
		if len(errs) > 5 {
			errs = append(errs[:5], fmt.Sprintf("… and %d more", len(errs)-5))
		}
		t.Notes = append(t.Notes, "Failed: "+strings.Join(errs, "; "))
	}
	return t, cErr
}

// concClaims are the benchmark's targets: c close to the limit on either
// model, and batching paying on the memory-bound one.
func concClaims(models []*concModel) []string {
	return []string{
		fmt.Sprintf("c ≥ 0.9 × best of a, b at 1, 2, 4, 8 concurrent, %s model", models[0].label),
		fmt.Sprintf("c ≥ 0.9 × best of a, b at 1, 2, 4, 8 concurrent, %s model", models[1].label),
		fmt.Sprintf("c at 8 concurrent ≥ 2.5 × c at 1, %s model", models[1].label),
		fmt.Sprintf("c ≥ Ollama (better of o, o1) at 1, 2, 4, 8 concurrent, %s model", models[0].label),
		fmt.Sprintf("c ≥ Ollama (better of o, o1) at 1, 2, 4, 8 concurrent, %s model", models[1].label),
	}
}

// peerConcWay is o: Ollama's OpenAI endpoint, streaming, each request on
// a connection of the shared client.
func peerConcWay(pr *peer, short, threads string) concWay {
	return concWay{name: fmt.Sprintf("%s Ollama %s, %s", short, pr.version, threads), short: short,
		gen: func(ctx context.Context, model string, r concReq) (concRun, error) {
			body := map[string]any{"model": model, "prompt": r.prompt, "max_tokens": r.n, "temperature": r.temp, "seed": r.seed}
			_, arrivals, text, err := streamCompletion(ctx, pr.base, body)
			return concRun{arrivals: arrivals, text: text}, err
		}}
}

// concFairness submits a ~1,500-token prompt and, right behind it, four
// short requests, and measures when the short ones see their first token;
// the same four alone are the baseline.
func concFairness(ctx context.Context, e *env, tok engine.Model, ways []concWay, m *concModel, rounds int) (*Table, error) {
	// Each round's long prompt starts otherwise, so that no way's prompt
	// cache holds it from the round before: the row measures a prefill.
	longs := make([]string, rounds+1)
	got := 0
	for r := range longs {
		var err error
		if longs[r], got, err = longPrompt(tok, concLongTokens, r); err != nil {
			return &Table{Intro: "Fairness: not measured."}, err
		}
	}
	t := &Table{
		Intro: fmt.Sprintf("**Fairness**, %s model, context %d: one request with a %d-token prompt (another each round, so that no prompt cache holds it) submitted first and, %s after it was queued (a: Generate called; c: the queen answered its submit, which for a prompt this long includes a worker measuring it), four short requests together (prompts 0–3 above), all generating %d tokens, greedy; "+
			"ways a and c as above, interleaved, rounds: %d after a warm-up round. **Short TTFT** is from a short request's submission to its first token (p50 and max over the four of every round); "+
			"**alone** is the same four submitted without the long one; **long TTFT** is the long request's (its prompt's prefill, with the short ones joining it).",
			m.label, m.ctx, got, concFairGap, concFairTokens, rounds),
		Header: []string{"way", "short TTFT p50", "short TTFT max", "short alone p50", "short alone max", "long TTFT p50"},
	}
	shorts := make([]concReq, 4)
	for i := range shorts {
		shorts[i] = concReq{prompt: concPrompts[i], n: concFairTokens, seed: concSeed}
	}
	type agg struct{ short, alone, long sample }
	res := make([]agg, len(ways))
	var errs []error
	for r := -1; r < rounds && ctx.Err() == nil; r++ {
		for i := range ways {
			wi := (i + max(r, 0)) % len(ways)
			w := ways[wi]
			short, longT, err := fairWave(ctx, w, m.name, concReq{prompt: longs[r+1], n: concFairTokens, seed: concSeed}, shorts)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", w.short, err))
				continue
			}
			alone, err := runWave(ctx, w, m.name, shorts)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s alone: %w", w.short, err))
				continue
			}
			if r >= 0 { // round -1 warms up
				res[wi].short = append(res[wi].short, durations(short)...)
				res[wi].long = append(res[wi].long, durations([]time.Duration{longT})...)
				res[wi].alone = append(res[wi].alone, durations(alone.ttfts)...)
			}
		}
	}
	for i, w := range ways {
		a := res[i]
		if len(a.short) == 0 {
			t.Rows = append(t.Rows, []string{w.name, "not measured"})
			continue
		}
		t.Rows = append(t.Rows, []string{w.name, ms(a.short.p50()), ms(a.short.max()), ms(a.alone.p50()), ms(a.alone.max()), ms(a.long.p50())})
	}
	e.logf("concurrency: fairness done")
	return t, errors.Join(errs...)
}

// fairWave starts the long request and, concFairGap after it is queued,
// the short ones; each is timed from its own submission.
func fairWave(ctx context.Context, w concWay, model string, long concReq, shorts []concReq) ([]time.Duration, time.Duration, error) {
	var wg sync.WaitGroup
	runs := make([]concRun, 1+len(shorts))
	starts := make([]time.Time, len(runs))
	errs := make([]error, len(runs))
	queued := make(chan struct{})
	long.queued = sync.OnceFunc(func() { close(queued) })
	starts[0] = time.Now()
	wg.Add(1)
	go func() {
		defer wg.Done()
		runs[0], errs[0] = w.gen(ctx, model, long)
		long.queued() // a failed submit queues nothing; do not wait for it
	}()
	<-queued
	time.Sleep(concFairGap)
	for i, r := range shorts {
		wg.Add(1)
		starts[1+i] = time.Now()
		go func() {
			defer wg.Done()
			runs[1+i], errs[1+i] = w.gen(ctx, model, r)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, 0, err
	}
	ttfts := make([]time.Duration, len(runs))
	for i, r := range runs {
		if len(r.arrivals) == 0 {
			return nil, 0, errors.New("a request got no token")
		}
		ttfts[i] = r.arrivals[0].Sub(starts[i])
	}
	return ttfts[1:], ttfts[0], nil
}

// longPrompt repeats the words of the short prompts, from the start-th on,
// until the text is about n tokens in m's tokenizer (BOS included).
func longPrompt(m engine.Model, n, start int) (string, int, error) {
	var b strings.Builder
	for i := start; ; i++ {
		if b.Len() > 0 {
			b.WriteString(" ")
		}
		b.WriteString(concPrompts[i%len(concPrompts)])
		toks, err := m.Tokenize(b.String(), true)
		if err != nil {
			return "", 0, err
		}
		if len(toks) >= n {
			return b.String(), len(toks), nil
		}
	}
}

// concIdentity runs each of the eight prompts alone, then all eight at
// once, greedy and seeded, and counts the outputs that are the same.
func concIdentity(ctx context.Context, ways []concWay, m *concModel, reqs func(n, count int) []concReq) (*Table, error) {
	const temp = 0.8
	t := &Table{
		Intro: fmt.Sprintf("**Identity**, %s model: each of the %d prompts generated alone (one after the other), then all %d at once, %d tokens each, greedy and seeded (temperature %.1f, seed %d); "+
			"**identical** is how many of the %d texts batched are the same as alone; **first difference** is the token index where the others first differ (p50, min). "+
			"llama.cpp decodes a step of one sequence with other kernels than a step of several (logits differ by about 1e-6 on the tiny F32 model, 5e-3 on this F16 one), "+
			"so a near-tie between two tokens may go the other way; after that the texts part. Separate contexts (b) decode each sequence alone in its context either way.",
			m.label, concSlots, concSlots, m.n, temp, concSeed, concSlots),
		Header: []string{"way", "sampling", "identical", "first difference p50", "first difference min"},
	}
	var errs []error
	for _, w := range ways {
		for _, mode := range []struct {
			name string
			temp float32
		}{{"greedy", 0}, {fmt.Sprintf("seeded (%.1f, seed %d)", temp, concSeed), temp}} {
			rs := reqs(m.n, concSlots)
			for i := range rs {
				rs[i].temp = mode.temp
			}
			alone := make([]concRun, len(rs))
			var err error
			for i, r := range rs {
				if alone[i], err = w.gen(ctx, m.name, r); err != nil {
					break
				}
			}
			var batched wave
			if err == nil {
				batched, err = runWave(ctx, w, m.name, rs)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("%s, %s: %w", w.short, mode.name, err))
				t.Rows = append(t.Rows, []string{w.name, mode.name, "not measured"})
				continue
			}
			same := 0
			var first sample
			for i := range rs {
				if alone[i].text == batched.runs[i].text {
					same++
					continue
				}
				a, b := alone[i].ids, batched.runs[i].ids
				k := 0
				for k < min(len(a), len(b)) && a[k] == b[k] {
					k++
				}
				first = append(first, float64(k))
			}
			p50, low := "—", "—"
			if len(first) > 0 {
				p50, low = fmt.Sprintf("%.0f", first.p50()), fmt.Sprintf("%.0f", first.pct(0))
			}
			t.Rows = append(t.Rows, []string{w.name, mode.name, fmt.Sprintf("%d of %d", same, len(rs)), p50, low})
		}
	}
	return t, errors.Join(errs...)
}
