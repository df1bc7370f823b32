package engine

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hybridgroup/yzma/pkg/llama"
	"github.com/rbee-dev/rbee/internal/threadpolicy"
)

// Continuous batching.
//
// A model's slots are sequences of a few llama contexts, its lanes. Each
// lane is owned by one goroutine, its loop, which is the only code that
// touches the lane's context, batch and samplers. Every step the loop builds
// one batch: the next token of every generating sequence, then prompt
// tokens of sequences being admitted, shortest first, up to the step's
// token budget (chunked prefill: a long prompt holds the generating ones
// back by one chunk at most). Sequences join and leave between steps.
//
// A sequence that leaves keeps its KV cells in its partition, as a prompt
// cache: a later request given that sequence id reuses the cells of the
// longest start its prompt shares with what the partition holds (the
// earlier prompt and the tokens generated after it) and decodes only the
// rest. A conversation resent whole at every turn (what chat clients do)
// then pays for the new turn's prefill only, not the history's. The cells
// cost nobody else anything: a partition is its sequence id's alone, and
// what a new request does not share is removed before it runs.
//
// The KV cache of a lane is split into one partition per sequence (llama.cpp's
// non-unified cache), each of the model's context size, rather than one
// cache shared by all: a sequence's attention then reads only its own
// cells, laid out as if it ran alone, so its output does not depend on what
// else runs (a unified cache interleaves the sequences' cells and the
// attention sums in another order); and a sequence can never be starved of
// cells by the others, so "context full" means what it says. The cost is
// that an idle slot's partition stays reserved, which is what the slot
// count from memory accounts for.
//
// Why several lanes and not always one: one context decodes its batch with
// all its threads, which pays when the weights are read from memory (once
// per step for every sequence) and on a GPU, but on a small model that sits
// in the CPU's cache, two contexts of one thread each beat one context of
// two threads (ggml's per-operation thread barriers dominate tiny matrices).
// LoadOptions.Lanes chooses; a sequence joins the lane with the fewest.
//
// Tokens are handed to the sequence's Generate goroutine through a queue,
// so a slow onToken (a bus publish) never stalls the loop and the tokens of
// every sequence decoded in one step go out without waiting on each other.

// lane is one llama context and the loop that owns it.
type lane struct {
	m      *llamaModel
	lctx   llama.Context
	mem    llama.Memory
	batch  llama.Batch
	nSeq   int // sequence capacity (n_seq_max)
	nCtx   int // context of each sequence, in tokens
	budget int // tokens per step (n_batch)

	// mu guards inbox, calls, closed, load and unfed, and the writes of
	// held (the loop, its only writer, reads it without).
	mu     sync.Mutex
	inbox  []*sequence
	calls  []func()
	closed bool
	load   int // sequences submitted and not yet finished
	// unfed is the prompt tokens of those sequences not decoded yet:
	// what a sequence joining the lane waits behind (pickLane).
	unfed int
	wake  chan struct{}
	done  chan struct{}

	// kvTokens is what the running sequences hold in the cache, written
	// by the loop after each step.
	kvTokens atomic.Int64

	// Owned by the loop.
	running []*sequence
	prefill []*sequence // scratch of step
	// stepIDs are the sequence ids of the last step, in order; passes
	// the widths of the passes it was decoded in (see passes.go).
	stepIDs []llama.SeqId
	passes  []int
	planner *passPlanner
	// beforeDecode, when set (by tests, on the loop), runs just before
	// each llama_decode.
	beforeDecode func()
	freeIDs      []llama.SeqId
	buf          []byte

	// held is, for every sequence id, the tokens its partition holds
	// (positions 0…len-1) of the sequence that used it last: the prompt
	// cache. Empty while a sequence runs on the id, and after a failed
	// decode. pickLane reads it too.
	held [][]llama.Token
	// released is, for every id, when its last sequence left (a count of
	// releases), and releases that count: owned by the loop.
	released []uint64
	releases uint64
}

// sequence is one request in a lane. The fields above the line are set by
// Generate before submitting and read by the loop; those below it are the
// loop's; out and end are shared, behind mu.
type sequence struct {
	req     Request
	prompt  []llama.Token
	sampler llama.Sampler
	start   time.Time
	// stop is set by Generate (cancelled, or onToken failed): the loop
	// drops the sequence at its next step.
	stop atomic.Bool

	id         llama.SeqId
	stepTokens int // tokens this step decodes of it
	fed        int // prompt tokens decoded, the reused ones included
	cached     int // prompt tokens reused from the partition's cache
	// cells are the tokens decoded into the sequence's partition, in
	// order of position: what lane.held keeps when it leaves.
	cells     []llama.Token
	nPast     int // tokens in the sequence's cache
	last      llama.Token
	logitIdx  int32
	generated int
	stream    *textStream
	ttft      time.Duration

	mu     sync.Mutex
	out    []Token
	end    *seqEnd
	notify chan struct{}
}

// seqEnd is how a sequence left its lane.
type seqEnd struct {
	reason StopReason
	err    error
	ttft   time.Duration
	cached int
}

func newLane(m *llamaModel, nSeq, threads int) (*lane, error) {
	cp := llama.ContextDefaultParams()
	cp.NCtx = uint32(m.ctxSize * nSeq)
	// One step's tokens; at least one per sequence, so that every
	// generating sequence moves every step.
	cp.NBatch = uint32(min(m.ctxSize*nSeq, max(stepBudget, nSeq)))
	cp.NUbatch = cp.NBatch
	cp.NSeqMax = uint32(nSeq)
	cp.KVUnified = 0
	cp.NThreads = int32(threads)
	cp.NThreadsBatch = int32(threads)
	cp.NoPerf = 1
	done := captureLog()
	lctx, err := llama.InitFromModel(m.handle, cp)
	logged := done()
	if err != nil || lctx == 0 {
		return nil, fmt.Errorf("engine: new context for %d sequences of %d tokens: %v %s", nSeq, m.ctxSize, err, logged)
	}
	mem, err := llama.GetMemory(lctx)
	if err != nil {
		_ = llama.Free(lctx)
		return nil, fmt.Errorf("engine: new context: %w", err)
	}
	// llama.cpp may round a sequence's context up; use no more than was
	// asked for.
	nCtx := m.ctxSize
	if n := int(llama.NCtxSeq(lctx)); n > 0 && n < nCtx {
		nCtx = n
	}
	l := &lane{
		m: m, lctx: lctx, mem: mem, nSeq: nSeq, nCtx: nCtx, budget: int(min(cp.NBatch, llama.NBatch(lctx))),
		batch: llama.BatchInit(int32(cp.NBatch), 0, 1),
		wake:  make(chan struct{}, 1), done: make(chan struct{}),
		buf: make([]byte, 64), held: make([][]llama.Token, nSeq), released: make([]uint64, nSeq),
		planner: newPassPlanner(nSeq),
	}
	for i := nSeq - 1; i >= 0; i-- {
		l.freeIDs = append(l.freeIDs, llama.SeqId(i))
	}
	go l.loop()
	return l, nil
}

// stepBudget is the most tokens one step decodes: every generating
// sequence's next token plus prompt tokens up to this many in all.
const stepBudget = 512

// submit hands s to the loop. It fails once the lane is closed.
func (l *lane) submit(s *sequence) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	l.inbox = append(l.inbox, s)
	l.mu.Unlock()
	l.kick()
	return nil
}

// between runs fn on the loop, between two steps, and waits for it: what
// fn does with the context cannot race a step. Tests use it to read logits.
func (l *lane) between(fn func()) {
	done := make(chan struct{})
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.calls = append(l.calls, func() { defer close(done); fn() })
	l.mu.Unlock()
	l.kick()
	<-done
}

func (l *lane) kick() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// close stops the loop, ending every sequence with ErrClosed, and frees the
// context.
func (l *lane) close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		<-l.done
		return
	}
	l.closed = true
	l.mu.Unlock()
	l.kick()
	<-l.done
	_ = llama.BatchFree(l.batch)
	_ = llama.Free(l.lctx)
}

func (l *lane) loop() {
	// The loop spends its time in llama_decode, a C call long enough
	// (milliseconds) for Go to hand its P to another thread meanwhile;
	// coming back, an unlocked goroutine waits for a P and resumes on
	// whichever thread the scheduler wakes, every step. Locked, it
	// keeps one thread (ggml's thread 0) and its CPU. Measured on the
	// 26 M model through a worker of one lane with both cores of a 2-core
	// VM (--lanes 1): 120-160 tokens/s unlocked, 190-240 locked (the
	// engine alone: 390).
	runtime.LockOSThread()
	// The rest of an rbee program runs as batch work (internal/threadpolicy),
	// so that its wake-ups do not cut into a decode; this thread decodes,
	// and llama.cpp's threads, started from it, inherit its policy. Best
	// effort: where it cannot be set, Background could not mark the
	// others either. The thread stays locked when the loop ends: Go then
	// ends it rather than hand an ordinary thread back to the program.
	_ = threadpolicy.Foreground()
	defer close(l.done)
	for {
		l.mu.Lock()
		inbox, calls, closed := l.inbox, l.calls, l.closed
		l.inbox, l.calls = nil, nil
		l.mu.Unlock()
		for _, fn := range calls {
			fn()
		}
		if closed {
			for _, s := range append(l.running, inbox...) {
				l.finish(s, StopError, fmt.Errorf("slot: %w", ErrClosed))
			}
			l.running = nil
			return
		}
		for _, s := range inbox {
			l.admit(s)
		}
		l.dropStopped()
		l.countKV()
		if len(l.running) == 0 {
			<-l.wake
			continue
		}
		l.step()
	}
}

// admit gives s a sequence id, and with it the cells of that id's partition
// that its prompt can reuse (see reuse).
func (l *lane) admit(s *sequence) {
	if len(l.freeIDs) == 0 {
		// The model's slot count keeps a lane's load within its capacity.
		l.finish(s, StopError, fmt.Errorf("engine: lane of %d sequences is full", l.nSeq))
		return
	}
	i := l.pickID(s.prompt)
	s.id = l.freeIDs[i]
	l.freeIDs = slices.Delete(l.freeIDs, i, i+1)
	held := l.held[s.id]
	l.mu.Lock()
	l.held[s.id] = nil
	l.mu.Unlock()
	s.cached = l.reuse(s.id, held, s.prompt)
	s.fed = s.cached
	s.cells = append(make([]llama.Token, 0, len(s.prompt)+min(s.req.MaxTokens, l.nCtx)), s.prompt[:s.cached]...)
	if s.cached > 0 {
		l.mu.Lock()
		l.unfed -= s.cached
		l.mu.Unlock()
	}
	s.stream = newTextStream(s.req.Stop)
	l.running = append(l.running, s)
}

// Which sequence id a request gets.
//
// The running ids must stay consecutive: llama.cpp decodes a partitioned
// cache's sequences in one pass only where their ids come in increasing,
// consecutive order, and splits the rest into passes of their own, each
// reading all the weights again (see step). So while others run, a request
// may take a free id inside their range (one a finished sequence left) or
// next to it, and another only for a cached start of reuseMin tokens or
// more, a saving that repays a pass of its own; with none running, any
// free id. Among those, the id whose cache spares the prompt most wins,
// counting only a start worth its cache (worth); with no such id, one that
// holds nothing, then the one left longest ago, so that a request sharing
// nothing does not take the cache of a conversation that goes on (least
// recently used).

// reuseMin is the shortest cached start worth an id that splits the
// running ones into two passes while it runs.
const reuseMin = 64

// usefulStart is the shortest cached start that counts in the choice of an
// id or a lane: a shared BOS and a word spare nothing worth a cache.
const usefulStart = 16

// worth is the tokens of prompt's start that held spares it, where that
// is worth the cache: usefulStart tokens or more, and at least what the
// request would remove of it. A new conversation that shares only its
// system prompt with a long one would otherwise take that one's id and
// cut its cache down to the system prompt, and the next turn of the long
// one would decode its whole history again.
func worth(held, prompt []llama.Token) int {
	n := reusable(held, prompt)
	if n < usefulStart || n < len(held)-n {
		return 0
	}
	return n
}

// pickID chooses the index in freeIDs of the id for prompt.
func (l *lane) pickID(prompt []llama.Token) int {
	lo, hi := -1, -1 // the running ids' range
	for _, s := range l.running {
		id := int(s.id)
		if lo < 0 || id < lo {
			lo = id
		}
		hi = max(hi, id)
	}
	type rank struct {
		spare int  // tokens its cache spares, if worth it
		hole  bool // fills a gap in the running range
		empty bool
		age   uint64 // release number: lower is older
		id    llama.SeqId
	}
	better := func(a, b rank) bool {
		aBig, bBig := a.spare >= reuseMin, b.spare >= reuseMin
		switch {
		case aBig != bBig:
			return aBig
		case aBig && a.spare != b.spare:
			return a.spare > b.spare
		case a.hole != b.hole:
			return a.hole
		case a.spare != b.spare:
			return a.spare > b.spare
		case a.empty != b.empty:
			return a.empty
		case a.age != b.age:
			return a.age < b.age
		}
		return a.id < b.id
	}
	pick := -1
	var best rank
	for i, id := range l.freeIDs {
		n := worth(l.held[id], prompt)
		near := lo < 0 || (int(id) >= lo-1 && int(id) <= hi+1)
		if !near && n < reuseMin {
			continue
		}
		r := rank{spare: n, hole: int(id) > lo && int(id) < hi, empty: len(l.held[id]) == 0, age: l.released[id], id: id}
		if pick < 0 || better(r, best) {
			pick, best = i, r
		}
	}
	if pick < 0 { // cannot happen: an id next to the running ones is free
		pick = len(l.freeIDs) - 1
	}
	return pick
}

// cachedStart is the most tokens of prompt's start that a free id's cache
// would spare it, where that is worth the cache. The caller holds l.mu.
func (l *lane) cachedStart(prompt []llama.Token) int {
	best := 0
	for _, h := range l.held {
		best = max(best, worth(h, prompt))
	}
	return best
}

// reuse empties id's partition of all but the longest start it shares with
// prompt, and returns that start's length: the prompt tokens the sequence
// need not decode.
//
// It leaves at least the prompt's last two tokens to decode. One is
// needed, as the first token is sampled from the last one's logits; two
// keep those logits what they are without a cache. llama.cpp computes a
// pass of one token with a matrix-vector kernel and a pass of several with
// a matrix-matrix one, which round differently, while a row of a
// matrix-matrix product comes out the same however many rows it has. Measured
// on the 26 M F16 test model (40 seeded requests, each sent twice): 28 of 40
// texts the same when the repeat decoded one token, 40 of 40 with two, and
// 40 of 40 the same as on a model with nothing cached.
func (l *lane) reuse(id llama.SeqId, held, prompt []llama.Token) int {
	n := reusable(held, prompt)
	// The cache itself says what it holds: where that is not what was
	// recorded (something else used the id, as tests do between steps),
	// none of it is reused.
	if n > 0 {
		if last, err := llama.MemorySeqPosMax(l.mem, id); err != nil || int(last) != len(held)-1 {
			n = 0
		}
	}
	if n > 0 && n < len(held) {
		if ok, err := llama.MemorySeqRm(l.mem, id, llama.Pos(n), -1); err != nil || !ok {
			n = 0 // a model whose memory cannot drop a sequence's tail
		}
	}
	if n == 0 {
		_, _ = llama.MemorySeqRm(l.mem, id, -1, -1)
	}
	return n
}

// reusable is how much of prompt's start held can spare it: their shared
// start, short of the last two prompt tokens (see reuse).
func reusable(held, prompt []llama.Token) int {
	return sharedStart(held, prompt[:max(len(prompt)-2, 0)])
}

// sharedStart is the length of the longest common start of a and b.
func sharedStart(a, b []llama.Token) int {
	n := min(len(a), len(b))
	for i := range n {
		if a[i] != b[i] {
			return i
		}
	}
	return n
}

func (l *lane) dropStopped() {
	kept := l.running[:0]
	for _, s := range l.running {
		if s.stop.Load() {
			l.release(s, true)
			l.finish(s, StopCancelled, nil)
			continue
		}
		kept = append(kept, s)
	}
	clear(l.running[len(kept):])
	l.running = kept
}

func (l *lane) countKV() {
	n := 0
	for _, s := range l.running {
		n += max(s.fed, s.nPast)
	}
	l.kvTokens.Store(int64(n))
}

// KVTokens implements KVReporter.
func (m *llamaModel) KVTokens() int {
	n := 0
	for _, l := range m.lanes {
		n += int(l.kvTokens.Load())
	}
	return n
}

// release frees s's sequence id. Its partition's cells stay, the id's
// prompt cache, when they hold what s decoded (kept); after a failed
// decode nobody knows what they hold, and they go.
func (l *lane) release(s *sequence, kept bool) {
	l.mu.Lock()
	if kept {
		l.held[s.id] = s.cells
	} else {
		l.held[s.id] = nil
	}
	l.mu.Unlock()
	if !kept {
		_, _ = llama.MemorySeqRm(l.mem, s.id, -1, -1)
	}
	s.cells = nil
	l.releases++
	l.released[s.id] = l.releases
	l.freeIDs = append(l.freeIDs, s.id)
	slices.SortFunc(l.freeIDs, func(a, b llama.SeqId) int { return int(b) - int(a) })
}

// step decodes one batch and samples the sequences it produced logits for;
// a step that feeds no prompt is decoded in the passes the lane measures
// cheapest (generate).
//
// The batch lists the sequences in increasing id order: with a cache
// partitioned per sequence, llama.cpp groups sequences into one forward pass
// only where their ids come in increasing, consecutive order, and splits the
// rest into passes of their own, each reading all the weights again (ids
// handed out lowest first keep the running ones consecutive).
func (l *lane) step() {
	// How many tokens each sequence gets this step: one for every
	// generating sequence; prompts are fed shortest remaining first, so
	// a short request that arrives while a long prompt is being fed gets
	// its first token at the next step instead of after the whole long
	// prefill (a long one is held back only while short ones fill a
	// whole step's budget, and for one step when a short one finishes:
	// below).
	budget := l.budget
	l.prefill = l.prefill[:0]
	for _, s := range l.running {
		s.stepTokens = 0
		if s.fed >= len(s.prompt) {
			s.stepTokens = 1
			budget--
		} else {
			l.prefill = append(l.prefill, s)
		}
	}
	slices.SortStableFunc(l.prefill, func(a, b *sequence) int {
		return (len(a.prompt) - a.fed) - (len(b.prompt) - b.fed)
	})
	// A step that feeds a prompt its last tokens (a request about to get
	// its first token) feeds no other prompt that it does not finish: the
	// chunk of a long prompt admitted with a short one waits for one short
	// step, rather than the short one for the chunk (measured: a short
	// request's first token at 631 ms, behind a 506-token chunk).
	fed, finishing := 0, false
	for _, s := range l.prefill {
		rest := len(s.prompt) - s.fed
		if budget <= 0 || (finishing && budget < rest) {
			break
		}
		s.stepTokens = min(budget, rest)
		finishing = finishing || s.stepTokens == rest
		budget -= s.stepTokens
		fed += s.stepTokens
	}
	slices.SortFunc(l.running, func(a, b *sequence) int { return int(a.id) - int(b.id) })
	if fed == 0 {
		l.generate()
		return
	}

	b := &l.batch
	_ = b.Clear()
	seqID := []llama.SeqId{0}
	var sampled, prefilled []*sequence
	l.stepIDs = l.stepIDs[:0]
	for _, s := range l.running {
		seqID[0] = s.id
		if s.stepTokens > 0 {
			l.stepIDs = append(l.stepIDs, s.id)
		}
		switch {
		case s.stepTokens == 0:
		case s.fed >= len(s.prompt):
			s.logitIdx = b.NTokens
			_ = b.Add(s.last, llama.Pos(s.nPast), seqID, true)
			s.cells = append(s.cells, s.last)
			s.nPast++
			sampled = append(sampled, s)
		default:
			for i := s.fed; i < s.fed+s.stepTokens; i++ {
				last := i == len(s.prompt)-1
				if last {
					s.logitIdx = b.NTokens
				}
				_ = b.Add(s.prompt[i], llama.Pos(i), seqID, last)
			}
			s.cells = append(s.cells, s.prompt[s.fed:s.fed+s.stepTokens]...)
			s.fed += s.stepTokens
			prefilled = append(prefilled, s)
			if s.fed == len(s.prompt) {
				s.nPast = len(s.prompt)
				sampled = append(sampled, s)
			}
		}
	}
	l.passes = append(l.passes[:0], int(b.NTokens))
	decoded := l.decode(append(sampled, prefilled...))
	// The step's prompt tokens count as unfed until they are decoded: a
	// request that joins the lane meanwhile waits for this step first
	// (the last chunk of a long prompt takes as long as the others).
	l.mu.Lock()
	l.unfed -= fed
	l.mu.Unlock()
	if decoded {
		l.sampleAll(sampled)
	}
	l.removeStopped()
}

// generate decodes a step in which every sequence of the step generates,
// in the passes the lane's planner finds cheapest: each a contiguous run
// of the step's sequences, whose ids are then consecutive too.
func (l *lane) generate() {
	gen := l.prefill[:0] // scratch: no prompt is fed this step
	l.stepIDs = l.stepIDs[:0]
	for _, s := range l.running {
		if s.stepTokens == 1 {
			gen = append(gen, s)
			l.stepIDs = append(l.stepIDs, s.id)
		}
	}
	if len(gen) == 0 {
		return
	}
	l.passes = l.planner.plan(len(gen), l.passes[:0])
	b := &l.batch
	seqID := []llama.SeqId{0}
	for _, n := range l.passes {
		pass := gen[:n]
		gen = gen[n:]
		_ = b.Clear()
		for _, s := range pass {
			seqID[0] = s.id
			s.logitIdx = b.NTokens
			_ = b.Add(s.last, llama.Pos(s.nPast), seqID, true)
			s.cells = append(s.cells, s.last)
			s.nPast++
		}
		t0 := time.Now()
		if l.decode(pass) {
			l.sampleAll(pass)
			l.planner.observe(n, time.Since(t0))
		}
	}
	l.removeStopped()
}

// decode evaluates the lane's batch, which holds tokens of seqs. When it
// fails, every one of them is in an unknown state: they end with the error.
func (l *lane) decode(seqs []*sequence) bool {
	if l.beforeDecode != nil {
		l.beforeDecode()
	}
	rc, err := llama.Decode(l.lctx, l.batch)
	if err == nil && rc != 0 {
		err = fmt.Errorf("llama_decode returned %d", rc)
	}
	if err == nil {
		return true
	}
	err = fmt.Errorf("%w: %w", ErrDecode, err)
	for _, s := range seqs {
		if !s.stop.Swap(true) {
			l.release(s, false)
			l.finish(s, StopError, err)
		}
	}
	return false
}

// sampleAll samples each of seqs from the batch just decoded, ending those
// whose generation is over.
func (l *lane) sampleAll(seqs []*sequence) {
	for _, s := range seqs {
		if s.stop.Load() {
			continue // dropped at the next step
		}
		if reason := l.sample(s); reason != "" {
			s.stop.Store(true)
			l.release(s, true)
			l.finish(s, reason, nil)
		}
	}
}

// removeStopped takes the sequences finish has ended out of running.
func (l *lane) removeStopped() {
	kept := l.running[:0]
	for _, s := range l.running {
		s.mu.Lock()
		ended := s.end != nil
		s.mu.Unlock()
		if !ended {
			kept = append(kept, s)
		}
	}
	clear(l.running[len(kept):])
	l.running = kept
}

// sample draws s's next token, hands it over, and says why s ends, if it
// does.
func (l *lane) sample(s *sequence) StopReason {
	tok := llama.SamplerSample(s.sampler, l.lctx, s.logitIdx)
	if s.generated == 0 {
		s.ttft = time.Since(s.start)
	}
	t := Token{Index: s.generated, ID: int32(tok)}
	s.generated++
	var stop StopReason
	if llama.VocabIsEOG(l.m.vocab, tok) {
		stop = StopEOS
		t.Text = s.stream.flush()
	} else {
		text, stopped := s.stream.push(l.m.piece(tok, &l.buf))
		t.Text = text
		switch {
		case stopped:
			stop = StopSequence
		case s.generated >= s.req.MaxTokens || s.nPast >= l.nCtx:
			stop = StopMaxTokens
			t.Text += s.stream.flush()
		}
	}
	s.mu.Lock()
	s.out = append(s.out, t)
	s.mu.Unlock()
	s.signal()
	s.last = tok
	return stop
}

// finish ends s: Generate returns once it has handed over every token.
// Its place in the lane is given up first: once Generate returns, the
// model's next pickLane must see this lane's true load.
func (l *lane) finish(s *sequence, reason StopReason, err error) {
	llama.SamplerFree(s.sampler)
	s.sampler = 0
	l.leave(len(s.prompt) - s.fed)
	s.mu.Lock()
	s.end = &seqEnd{reason: reason, err: err, ttft: s.ttft, cached: s.cached}
	s.mu.Unlock()
	s.signal()
}

func (s *sequence) signal() {
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// take returns the tokens handed over since the last call, and the end once
// the loop has ended the sequence.
func (s *sequence) take(into []Token) ([]Token, *seqEnd) {
	s.mu.Lock()
	defer s.mu.Unlock()
	into = append(into[:0], s.out...)
	s.out = s.out[:0]
	return into, s.end
}

// run submits s to a lane of m and hands its tokens to onToken as they come,
// until the lane ends it. A cancelled ctx or a failing onToken stops it
// within one step; no token is handed over after that.
func (m *llamaModel) run(ctx context.Context, s *sequence, onToken func(Token) error, res *Result) error {
	l, err := m.pickLane(ctx, s.prompt)
	if err != nil {
		if ctx.Err() != nil {
			res.StopReason = StopCancelled
			return nil
		}
		res.StopReason = StopError
		return err
	}
	defer m.leaveLane()
	if err := l.submit(s); err != nil {
		l.leave(len(s.prompt))
		llama.SamplerFree(s.sampler)
		res.StopReason = StopError
		return fmt.Errorf("slot: %w", err)
	}
	var (
		toks      []Token
		end       *seqEnd
		cbErr     error
		cancelled bool
		done      = ctx.Done()
	)
	for end == nil {
		select {
		case <-s.notify:
		case <-done:
			cancelled = true
			done = nil
			s.stop.Store(true)
			l.kick()
		}
		toks, end = s.take(toks)
		for _, t := range toks {
			if cancelled || cbErr != nil {
				break
			}
			if ctx.Err() != nil {
				cancelled = true
				s.stop.Store(true)
				l.kick()
				break
			}
			res.CompletionTokens++
			if err := onToken(t); err != nil {
				cbErr = err
				s.stop.Store(true)
				l.kick()
			}
		}
	}
	res.TimeToFirstToken = end.ttft
	res.CachedTokens = end.cached
	switch {
	case cbErr != nil:
		res.StopReason = StopError
		return fmt.Errorf("engine: token callback: %w", cbErr)
	case end.err != nil:
		res.StopReason = StopError
		return end.err
	case cancelled || end.reason == StopCancelled:
		res.StopReason = StopCancelled
		return nil
	}
	res.StopReason = end.reason
	return nil
}

// pickLane waits for a free slot of the model and takes a place, for
// prompt, in the lane where a new sequence waits least for its first token.
//
// That wait is the step in progress and the sequence's own first step,
// and a step's time goes with its tokens: one per generating sequence,
// and the prompt tokens being fed, up to the step's budget; the sequence's
// own prompt counts for what the lane's prompt cache does not hold of it
// (up to a step, as for the others). A lane feeding
// a long prompt makes every step a full budget; one decoding a few short
// requests makes small ones. Counting sequences alone sent a short request
// to the lane feeding a long prompt as often as not (it then waited a
// whole 512-token step of it, 0.5-0.8 s on the 26 M model, while the other
// lane answered in 25 ms). Once prompts are fed, this is the sequence
// count: the lanes' decoding stays balanced.
func (m *llamaModel) pickLane(ctx context.Context, prompt []llama.Token) (*lane, error) {
	select {
	case m.seqs <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	m.pickMu.Lock()
	defer m.pickMu.Unlock()
	// A lane holds at most its sequence capacity; the model's slots (the
	// semaphore above) leave room in at least one.
	var best *lane
	bestCost := 0
	for _, l := range m.lanes {
		l.mu.Lock()
		full := l.load >= l.nSeq
		cost := l.load + min(l.unfed, l.budget) + min(len(prompt)-l.cachedStart(prompt), l.budget)
		l.mu.Unlock()
		if !full && (best == nil || cost < bestCost) {
			best, bestCost = l, cost
		}
	}
	best.mu.Lock()
	best.load++
	best.unfed += len(prompt)
	best.mu.Unlock()
	return best, nil
}

// leave gives up a sequence's place in the lane (pickLane), with the
// prompt tokens of it not fed.
func (l *lane) leave(unfedTokens int) {
	l.mu.Lock()
	l.load--
	l.unfed -= unfedTokens
	l.mu.Unlock()
}

func (m *llamaModel) leaveLane() { <-m.seqs }
