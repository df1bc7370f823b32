package engine

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hybridgroup/yzma/pkg/llama"

	"github.com/rbee-dev/rbee/internal/gguf"
)

// A decode step of one sequence is computed by another llama.cpp kernel
// than a step of several (a matrix-vector product against a matrix
// product): the logits differ by up to ~2e-6 on the tiny F32 model and
// ~5e-3 on the 26 M F16 one. Greedy output is the same whichever kernel ran
// as long as the best token leads the second by more than that; the
// requests below are checked to (greedyMargin), so their greedy output must
// be identical alone or batched. Sampled (seeded) requests can pick another
// token where the random draw lands within that much of a boundary: the
// tests run them too but only count how many match.
var kernelSlack = map[string]float32{"tiny": 1e-4, "large": 0.05}

// batchRequests are distinct requests, greedy and seeded, with and without
// stop sequences and penalties; every greedy one leads by more than slack
// at every step.
func batchRequests(t *testing.T, m Model, slack float32, n, maxTokens int) []Request {
	t.Helper()
	var reqs []Request
	for i := 0; len(reqs) < n && i < 40*n; i++ {
		r := Request{Prompt: testPrompt(i), MaxTokens: maxTokens - i%3, Seed: uint32(i + 1)}
		switch len(reqs) % 4 {
		case 1:
			r.Temperature, r.TopK, r.TopP = 0.8, 40, 0.95
		case 2:
			r.Temperature, r.MinP, r.RepeatPenalty = 1.1, 0.05, 1.1
		case 3:
			r.Stop = []string{"ee"}
		}
		if r.Temperature == 0 && greedyMargin(t, m, r) <= slack {
			continue
		}
		reqs = append(reqs, r)
	}
	require.Len(t, reqs, n, "not enough requests whose greedy output is robust")
	return reqs
}

// testPrompt is the i-th of many distinct prompts.
func testPrompt(i int) string {
	words := []string{"hello", "world", "the", "bee", "is", "a", "hive", "queen", "honey", "flower"}
	var b strings.Builder
	for j := range 3 + i%5 {
		b.WriteString(words[(i*7+j*3+i/10)%len(words)])
		b.WriteByte(' ')
	}
	return b.String()
}

// repeatWords is a prompt of about n bytes of the vocabulary's words.
func repeatWords(n int) string {
	words := strings.Fields("the bee is a hive of honey and flower world hello queen")
	var b strings.Builder
	for i := 0; b.Len() < n; i++ {
		b.WriteString(words[i%len(words)])
		b.WriteByte(' ')
	}
	return b.String()
}

// greedyMargin decodes r greedily, alone, on the first lane of m, and
// returns the smallest lead of the best logit over the second.
func greedyMargin(t *testing.T, mi Model, r Request) float32 {
	t.Helper()
	m := mi.(*llamaModel)
	prompt, err := m.Tokenize(r.Prompt, true)
	require.NoError(t, err)
	var margin float32
	m.lanes[0].between(func() { margin = laneMargin(t, m.lanes[0], prompt, r.MaxTokens) })
	return margin
}

// sameCount counts the runs of got equal to want.
func sameCount(want, got []run) int {
	n := 0
	for i := range want {
		if got[i].err == nil && got[i].text == want[i].text {
			n++
		}
	}
	return n
}

// loadBatched loads path with slots sequences over lanes contexts, closed
// at the end of the test.
func loadBatched(t *testing.T, path string, slots, lanes, ctx int) Model {
	t.Helper()
	eng, _ := tiny(t)
	m, err := eng.Load(context.Background(), path, LoadOptions{Threads: 1, ContextSize: ctx, Slots: slots, Lanes: lanes})
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close() })
	return m
}

var (
	largeOnce sync.Once
	largePath string
	largeErr  error
)

// large is the path of the 26 M-parameter model, written once per run.
func large(t *testing.T) string {
	t.Helper()
	largeOnce.Do(func() {
		largePath = filepath.Join(modelDir, "large.gguf")
		largeErr = gguf.SynthFile(largePath, gguf.Large())
	})
	require.NoError(t, largeErr)
	return largePath
}

// solo runs each request alone on m.
func solo(t *testing.T, m Model, reqs []Request) []run {
	t.Helper()
	s := newSlot(t, m)
	out := make([]run, len(reqs))
	for i, r := range reqs {
		out[i] = generate(context.Background(), s, r)
		require.NoError(t, out[i].err, "request %d", i)
	}
	return out
}

// together runs reqs at once, each on its own slot, the i-th after
// delays[i] (nil: all at once).
func together(m Model, reqs []Request, delays []time.Duration) []run {
	out := make([]run, len(reqs))
	var wg sync.WaitGroup
	for i, r := range reqs {
		s, err := m.NewSlot()
		if err != nil {
			out[i].err = err
			continue
		}
		wg.Go(func() {
			defer s.Close()
			if delays != nil {
				time.Sleep(delays[i])
			}
			out[i] = generate(context.Background(), s, r)
		})
	}
	wg.Wait()
	return out
}

// assertSameRuns checks that every run of got equals want; sampled ones
// only when all is set (see kernelSlack).
func assertSameRuns(t *testing.T, reqs []Request, want, got []run, what string) {
	t.Helper()
	for i := range want {
		require.NoError(t, got[i].err, "%s: request %d", what, i)
		if reqs != nil && reqs[i].Temperature != 0 {
			continue
		}
		assert.Equal(t, want[i].text, got[i].text, "%s: request %d", what, i)
		assert.Equal(t, ids(want[i].tokens), ids(got[i].tokens), "%s: request %d", what, i)
		assert.Equal(t, want[i].res.StopReason, got[i].res.StopReason, "%s: request %d", what, i)
		assert.Equal(t, want[i].res.CompletionTokens, got[i].res.CompletionTokens, "%s: request %d", what, i)
	}
}

func ids(toks []Token) []int32 {
	out := make([]int32, len(toks))
	for i, t := range toks {
		out[i] = t.ID
	}
	return out
}

// laneMargin decodes prompt and n greedy tokens on l, one token per step
// in sequence 0, and returns the smallest lead of the best logit over the
// second. It must run on the lane's loop (lane.between).
func laneMargin(t *testing.T, l *lane, prompt []int32, n int) float32 {
	t.Helper()
	// Sequence 0 may hold an earlier request's cells (its prompt cache):
	// start from nothing, and leave nothing.
	_, _ = llama.MemorySeqRm(l.mem, 0, -1, -1)
	defer func() { _, _ = llama.MemorySeqRm(l.mem, 0, -1, -1) }()
	b := &l.batch
	seq := []llama.SeqId{0}
	for i := 0; i < len(prompt); i++ {
		_ = b.Clear()
		for ; i < len(prompt) && b.NTokens < int32(l.budget); i++ {
			require.NoError(t, b.Add(llama.Token(prompt[i]), llama.Pos(i), seq, i == len(prompt)-1))
		}
		i--
		if i < len(prompt)-1 {
			rc, err := llama.Decode(l.lctx, *b)
			require.NoError(t, err)
			require.Zero(t, rc)
		}
	}
	margin := float32(math.Inf(1))
	pos := len(prompt)
	for step := 0; ; step++ {
		rc, err := llama.Decode(l.lctx, *b)
		require.NoError(t, err)
		require.Zero(t, rc)
		logits, err := llama.GetLogitsIth(l.lctx, b.NTokens-1, int(l.m.nVocab))
		require.NoError(t, err)
		best, second, arg := float32(math.Inf(-1)), float32(math.Inf(-1)), 0
		for k, v := range logits {
			switch {
			case v > best:
				best, second, arg = v, best, k
			case v > second:
				second = v
			}
		}
		margin = min(margin, best-second)
		if step+1 >= n || pos >= l.nCtx || llama.VocabIsEOG(l.m.vocab, llama.Token(arg)) {
			return margin
		}
		_ = b.Clear()
		require.NoError(t, b.Add(llama.Token(arg), llama.Pos(pos), seq, true))
		pos++
	}
}

// A request's output does not depend on what runs beside it: alone, or
// batched with 1, 3 or 7 others, in one lane or two, on the tiny and the
// 26 M models.
func TestBatchedEqualsSolo(t *testing.T) {
	_, _ = tiny(t)
	models := []struct {
		name string
		path string
		n    int
	}{{"tiny", tinyPath, 48}, {"large", large(t), 24}}
	for _, mc := range models {
		t.Run(mc.name, func(t *testing.T) {
			one := loadBatched(t, mc.path, 1, 1, 256)
			reqs := batchRequests(t, one, kernelSlack[mc.name], 8, mc.n)
			want := solo(t, one, reqs)
			sampled, sampledSame := 0, 0
			for _, lanes := range []int{1, 2} {
				m := loadBatched(t, mc.path, 8, lanes, 256)
				// Alone in the batched model first: the partitioned cache
				// makes it the same as a model of one slot, sampled too.
				assertSameRuns(t, nil, want, solo(t, m, reqs), fmt.Sprintf("alone, %d lanes", lanes))
				for _, k := range []int{2, 4, 8} {
					for start := 0; start < len(reqs); start += k {
						got := together(m, reqs[start:start+k], nil)
						assertSameRuns(t, reqs[start:start+k], want[start:start+k], got, fmt.Sprintf("%d together, %d lanes", k, lanes))
						for i, r := range reqs[start : start+k] {
							if r.Temperature != 0 {
								sampled++
								sampledSame += sameCount(want[start+i:start+i+1], got[i:i+1])
							}
						}
					}
				}
			}
			t.Logf("%s: sampled requests identical batched and alone: %d of %d", mc.name, sampledSame, sampled)
		})
	}
}

// Eight sequences joining and leaving at random steps (random arrival,
// random lengths) each give their solo output.
func TestBatchedJoinAndLeave(t *testing.T) {
	_, _ = tiny(t)
	rng := rand.New(rand.NewPCG(1, 2))
	m := loadBatched(t, tinyPath, 8, 1, 256)
	base := batchRequests(t, m, kernelSlack["tiny"], 8, 64)
	for round := range 3 {
		reqs := make([]Request, 24)
		delays := make([]time.Duration, len(reqs))
		for i := range reqs {
			reqs[i] = base[rng.IntN(len(base))]
			reqs[i].MaxTokens = 1 + rng.IntN(64)
			delays[i] = time.Duration(rng.IntN(30)) * time.Millisecond
		}
		want := solo(t, m, reqs)
		got := together(m, reqs, delays) // 24 on 8 slots: the rest wait
		assertSameRuns(t, reqs, want, got, fmt.Sprintf("round %d", round))
	}
}

// Cancelling one of four stops it within a step and leaves the other
// three as they would be alone.
func TestBatchedCancelOne(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 4, 1, 512)
	var reqs []Request
	for i := 0; len(reqs) < 4 && i < 400; i++ {
		r := Request{Prompt: testPrompt(i), MaxTokens: 400, Seed: 1}
		if greedyMargin(t, m, r) > kernelSlack["tiny"] {
			reqs = append(reqs, r)
		}
	}
	require.Len(t, reqs, 4, "not enough long greedy requests whose output is robust")
	want := solo(t, m, reqs)
	for _, w := range want {
		require.Equal(t, StopMaxTokens, w.res.StopReason, "the test needs long runs")
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make([]run, 4)
	var wg sync.WaitGroup
	var afterCancel int
	for i := range reqs {
		s := newSlot(t, m)
		wg.Go(func() {
			if i != 2 {
				got[i] = generate(context.Background(), s, reqs[i])
				return
			}
			var b strings.Builder
			cancelled := false
			got[i].res, got[i].err = s.Generate(ctx, reqs[i], func(tok Token) error {
				if cancelled {
					afterCancel++
				}
				got[i].tokens = append(got[i].tokens, tok)
				b.WriteString(tok.Text)
				if tok.Index == 20 {
					cancel()
					cancelled = true
				}
				return nil
			})
			got[i].text = b.String()
		})
	}
	wg.Wait()
	require.NoError(t, got[2].err)
	assert.Equal(t, StopCancelled, got[2].res.StopReason)
	assert.Zero(t, afterCancel, "no token is handed over after the cancel")
	assert.Len(t, got[2].tokens, 21)
	assert.Equal(t, ids(want[2].tokens[:21]), ids(got[2].tokens))
	for _, i := range []int{0, 1, 3} {
		assertSameRuns(t, reqs[i:i+1], want[i:i+1], got[i:i+1], fmt.Sprintf("request %d beside the cancelled one", i))
	}
	requireLanesEmpty(t, m)
}

// requireLanesEmpty checks that every sequence, finished or cancelled,
// gave up its place in its lane: what pickLane weighs is back to nothing.
func requireLanesEmpty(t *testing.T, m Model) {
	t.Helper()
	for i, l := range m.(*llamaModel).lanes {
		l.mu.Lock()
		load, unfed := l.load, l.unfed
		l.mu.Unlock()
		require.Zero(t, load, "lane %d: sequences", i)
		require.Zero(t, unfed, "lane %d: prompt tokens not fed", i)
	}
}

// A request joins the lane where it waits least for its first token: not
// the one feeding a long prompt, whose every step is a full budget, while
// another lane has room; once prompts are fed, lanes are chosen by their
// sequences; and a full lane takes no more, however cheap it looks.
func TestPickLaneAvoidsALaneFeedingALongPrompt(t *testing.T) {
	_, _ = tiny(t)
	type place struct {
		l     *lane
		unfed int
	}
	// pick takes a place for a prompt of n tokens; every place is given
	// back at the end, and the lanes must be empty then.
	pick := func(t *testing.T, m *llamaModel, places *[]place, n int) *lane {
		t.Helper()
		l, err := m.pickLane(context.Background(), make([]llama.Token, n))
		require.NoError(t, err)
		*places = append(*places, place{l, n})
		return l
	}
	// feed counts a place's prompt as fed, as a step does.
	feed := func(places []place, l *lane) {
		for i := range places {
			if places[i].l == l {
				l.mu.Lock()
				l.unfed -= places[i].unfed
				l.mu.Unlock()
				places[i].unfed = 0
			}
		}
	}
	release := func(t *testing.T, m *llamaModel, places []place) {
		for _, p := range places {
			p.l.leave(p.unfed)
			m.leaveLane()
		}
		requireLanesEmpty(t, m)
	}

	t.Run("shorts avoid a long prefill, then sequences count", func(t *testing.T) {
		m := loadBatched(t, tinyPath, 6, 2, 2048).(*llamaModel) // two lanes of 3
		var places []place
		long := pick(t, m, &places, 1500)
		for i := range 2 {
			short := pick(t, m, &places, 8)
			require.False(t, long == short, "short request %d joined the lane feeding a long prompt", i)
		}
		for _, l := range m.lanes {
			feed(places, l)
		}
		// Every prompt fed: one sequence in the long one's lane, two in
		// the other.
		require.True(t, long == pick(t, m, &places, 8), "with every prompt fed, the lane with fewer sequences")
		release(t, m, places)
	})
	t.Run("a full lane takes no more", func(t *testing.T) {
		m := loadBatched(t, tinyPath, 4, 2, 2048).(*llamaModel) // two lanes of 2
		var places []place
		long := pick(t, m, &places, 1500)
		pick(t, m, &places, 8)
		pick(t, m, &places, 8) // the other lane is full now
		require.True(t, long == pick(t, m, &places, 8), "the fourth request goes where there is room")
		for _, l := range m.lanes {
			l.mu.Lock()
			require.LessOrEqual(t, l.load, l.nSeq)
			l.mu.Unlock()
		}
		release(t, m, places)
	})
}

// A prompt's chunk counts as not fed until its decode ends: a request that
// picks a lane while a long prompt's last chunk decodes (as long as any
// other chunk) does not join that lane as if it were idle.
func TestPickLaneCountsTheChunkBeingDecoded(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 6, 2, 2048).(*llamaModel) // two lanes of 3
	long, other := m.lanes[0], m.lanes[1]
	// Two places in the other lane (taken while the first lane holds a
	// long prompt's place, which is then given back): it is the busier,
	// by sequences.
	first, err := m.pickLane(context.Background(), make([]llama.Token, 1500))
	require.NoError(t, err)
	require.True(t, first == long)
	for range 2 {
		l, err := m.pickLane(context.Background(), make([]llama.Token, 8))
		require.NoError(t, err)
		require.True(t, l == other)
	}
	first.leave(1500)
	m.leaveLane()
	t.Cleanup(func() {
		for range 2 {
			other.leave(8)
			m.leaveLane()
		}
		requireLanesEmpty(t, m)
	})

	var picked *lane
	long.between(func() {
		long.beforeDecode = func() {
			if picked != nil || long.batch.NTokens < 100 {
				return
			}
			l, err := m.pickLane(context.Background(), make([]llama.Token, 8))
			if !assert.NoError(t, err) { // on the loop: no FailNow
				return
			}
			picked = l
			l.leave(8)
			m.leaveLane()
		}
	})
	s := newSlot(t, m)
	prompt := repeatWords(400) // one chunk (of a few hundred tokens): the last
	res, err := s.Generate(context.Background(), Request{Prompt: prompt, MaxTokens: 1}, func(Token) error { return nil })
	require.NoError(t, err)
	require.Greater(t, res.PromptTokens, 100)
	long.between(func() { long.beforeDecode = nil })
	require.NotNil(t, picked, "no chunk of the long prompt was seen decoding")
	assert.True(t, picked == other, "a request joined the lane whose long prompt was decoding")
}

// A prompt longer than one step's budget is fed in chunks: its output is
// its solo output, and a sequence already generating keeps getting tokens
// while it is fed.
func TestBatchedLongPrompt(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 2, 1, 2048)
	long := Request{Prompt: repeatWords(3000), MaxTokens: 16, Seed: 1}
	toks, err := m.Tokenize(long.Prompt, true)
	require.NoError(t, err)
	require.Greater(t, len(toks), 2*stepBudget, "the prompt must take several steps")
	require.Less(t, len(toks)+16, 2048)
	require.Greater(t, greedyMargin(t, m, long), kernelSlack["tiny"])
	short := Request{Prompt: "hello world", MaxTokens: 1000, Seed: 1}
	require.Greater(t, greedyMargin(t, m, short), kernelSlack["tiny"])
	want := solo(t, m, []Request{long, short})

	var mu sync.Mutex
	var events []string
	note := func(e string) {
		mu.Lock()
		events = append(events, e)
		mu.Unlock()
	}
	shortStarted := make(chan struct{})
	var got [2]run
	var wg sync.WaitGroup
	sShort, sLong := newSlot(t, m), newSlot(t, m)
	wg.Go(func() {
		var b strings.Builder
		got[1].res, got[1].err = sShort.Generate(context.Background(), short, func(tok Token) error {
			got[1].tokens = append(got[1].tokens, tok)
			b.WriteString(tok.Text)
			note("short")
			if tok.Index == 5 {
				close(shortStarted)
			}
			return nil
		})
		got[1].text = b.String()
	})
	<-shortStarted
	wg.Go(func() {
		note("long submitted")
		var b strings.Builder
		got[0].res, got[0].err = sLong.Generate(context.Background(), long, func(tok Token) error {
			got[0].tokens = append(got[0].tokens, tok)
			b.WriteString(tok.Text)
			note("long")
			return nil
		})
		got[0].text = b.String()
	})
	wg.Wait()
	assertSameRuns(t, nil, want, got[:], "long prompt beside a generating one")
	// Between the long prompt's submission and its first token, the short
	// one got a token at every chunk of the prefill.
	between, counting := 0, false
	for _, e := range events {
		if e == "long" {
			break
		}
		if e == "long submitted" {
			counting = true
		} else if counting {
			between++
		}
	}
	assert.GreaterOrEqual(t, between, len(toks)/stepBudget, "the short sequence moved at every prefill chunk")
	requireLanesEmpty(t, m)
}

// A sequence that reaches the end of its context stops there with
// max_tokens, in a batch, without disturbing the others.
func TestBatchedContextEnd(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 3, 1, 64)
	reqs := []Request{
		{Prompt: "hello world, the bee is", MaxTokens: 64, Seed: 1},
		{Prompt: "the hive", MaxTokens: 10, Seed: 2},
		{Prompt: "a queen bee", MaxTokens: 64, Seed: 3, Temperature: 0.7},
	}
	require.Greater(t, greedyMargin(t, m, reqs[0]), kernelSlack["tiny"])
	require.Greater(t, greedyMargin(t, m, reqs[1]), kernelSlack["tiny"])
	want := solo(t, m, reqs)
	assert.Equal(t, StopMaxTokens, want[0].res.StopReason)
	// The last token is sampled from a full cache and never decoded.
	assert.Equal(t, 64+1, want[0].res.PromptTokens+want[0].res.CompletionTokens, "it ran to the context's end")
	got := together(m, reqs, nil)
	assertSameRuns(t, reqs, want, got, "at the context's end")
	assert.Equal(t, StopMaxTokens, got[2].res.StopReason)
	assert.Equal(t, 64+1, got[2].res.PromptTokens+got[2].res.CompletionTokens)
}

// A sequence's KV cells are given back when it leaves (what its id's next
// request does not share is removed before it runs): 1,000 requests through
// 4 slots of 64 tokens never run out of cache.
func TestBatchedFreesKV(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 4, 1, 64)
	var reqs []Request
	for _, r := range batchRequests(t, m, kernelSlack["tiny"], 16, 30) {
		if r.Temperature == 0 {
			reqs = append(reqs, r)
		}
	}
	want := solo(t, m, reqs)
	const total = 1000
	var wg sync.WaitGroup
	errs := make(chan error, total)
	next := make(chan int, total)
	for i := range total {
		next <- i
	}
	close(next)
	for range 4 {
		s := newSlot(t, m)
		wg.Go(func() {
			for i := range next {
				r := generate(context.Background(), s, reqs[i%len(reqs)])
				switch {
				case r.err != nil:
					errs <- fmt.Errorf("request %d: %w", i, r.err)
				case r.text != want[i%len(reqs)].text:
					errs <- fmt.Errorf("request %d: %q, want %q", i, r.text, want[i%len(reqs)].text)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// More Generates than slots wait for a slot; one cancelled while it waits
// returns at once, and the slot serves the next one when it frees.
func TestBatchedWaitsForSlot(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 1, 1, 256)
	hold, other := newSlot(t, m), newSlot(t, m)
	holding, unhold := make(chan struct{}), make(chan struct{})
	held := make(chan run)
	go func() {
		var r run
		r.res, r.err = hold.Generate(context.Background(), greedy(5), func(tok Token) error {
			if tok.Index == 0 {
				close(holding)
				<-unhold
			}
			return nil
		})
		held <- r
	}()
	<-holding
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	r := generate(ctx, other, greedy(3))
	require.NoError(t, r.err)
	assert.Equal(t, StopCancelled, r.res.StopReason)
	assert.Empty(t, r.tokens)
	close(unhold)
	require.NoError(t, (<-held).err)
	r = generate(context.Background(), other, greedy(3))
	require.NoError(t, r.err)
	assert.Len(t, r.tokens, 3)
}

// A short request that arrives while a long prompt is being fed gets its
// first token before the long one does: prompts are fed shortest first.
func TestBatchedShortPromptOvertakesALongPrefill(t *testing.T) {
	m := loadBatched(t, large(t), 2, 1, 2048)
	long := Request{Prompt: repeatWords(4000), MaxTokens: 2, Seed: 1}
	toks, err := m.Tokenize(long.Prompt, true)
	require.NoError(t, err)
	require.Greater(t, len(toks), 2*stepBudget)
	require.Less(t, len(toks), 2040)

	var mu sync.Mutex
	var firsts []string
	first := func(who string) func(Token) error {
		return func(tok Token) error {
			if tok.Index == 0 {
				mu.Lock()
				firsts = append(firsts, who)
				mu.Unlock()
			}
			return nil
		}
	}
	var wg sync.WaitGroup
	sLong, sShort := newSlot(t, m), newSlot(t, m)
	wg.Go(func() {
		_, err := sLong.Generate(context.Background(), long, first("long"))
		assert.NoError(t, err)
	})
	// Once the long prompt's first chunk is in the cache, the short one
	// comes.
	require.Eventually(t, func() bool { return m.(KVReporter).KVTokens() > 0 }, 10*time.Second, time.Millisecond)
	_, err = sShort.Generate(context.Background(), Request{Prompt: "hello world", MaxTokens: 2, Seed: 1}, first("short"))
	require.NoError(t, err)
	wg.Wait()
	assert.Equal(t, []string{"short", "long"}, firsts)
}

// A short request admitted in the same step as a long prompt gets its first
// token from a step of its own: the long prompt's chunk waits one short
// step, not the short request for the chunk.
func TestBatchedShortPromptAdmittedWithALongOneGoesFirst(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 2, 1, 2048)
	l := m.(*llamaModel).lanes[0]
	// The decodes, on the loop, that ran while the short request had no
	// token yet: the one that gives it its first token included.
	var waited []int
	l.between(func() {
		l.beforeDecode = func() {
			for _, s := range l.running {
				if len(s.prompt) < 16 && s.generated == 0 {
					waited = append(waited, int(l.batch.NTokens))
					return
				}
			}
		}
	})

	// The loop waits while both requests join its inbox.
	gate := make(chan struct{})
	blocked := make(chan struct{})
	go l.between(func() { close(blocked); <-gate })
	<-blocked
	var wg sync.WaitGroup
	for _, prompt := range []string{repeatWords(1200), "hello world"} {
		s := newSlot(t, m)
		wg.Go(func() {
			_, err := s.Generate(context.Background(), Request{Prompt: prompt, MaxTokens: 2, Seed: 1}, func(Token) error { return nil })
			assert.NoError(t, err)
		})
	}
	require.Eventually(t, func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return len(l.inbox) == 2
	}, 10*time.Second, time.Millisecond)
	close(gate)
	wg.Wait()
	l.between(func() { l.beforeDecode = nil })
	require.NotEmpty(t, waited)
	assert.Less(t, slices.Max(waited), 16, "the short request's first token waited for decodes of %v tokens", waited)
}

// Sequences that join one by one share each step's forward pass: the batch
// lists them in increasing, consecutive id order, which is what llama.cpp
// needs to decode a partitioned cache's sequences together rather than one
// pass each.
func TestBatchedSequencesShareOnePass(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 8, 1, 2048)
	l := m.(*llamaModel).lanes[0]
	// A first wave, ending in its own order, leaves the free ids in
	// whatever order they were freed.
	first := make([]Request, 8)
	for i := range first {
		first[i] = Request{Prompt: testPrompt(i), MaxTokens: 5 + 7*(7-i), Seed: 1}
	}
	together(m, first, nil)
	var ids []llama.SeqId
	whileGenerating(t, m, 8, 2*time.Millisecond, func() { // one by one
		l.between(func() { ids = append(ids, l.stepIDs...) })
	})
	assert.Equal(t, []llama.SeqId{0, 1, 2, 3, 4, 5, 6, 7}, ids)
}

// pinPasses fixes what the lane's planner believes a pass of each width
// costs (costs[n], any unit; costs[0] unused), and so the passes it plans.
func pinPasses(l *lane, costs ...float64) {
	l.between(func() {
		l.planner.pinned = true
		copy(l.planner.cost, costs)
	})
}

// whileGenerating starts n requests on m, gap apart, each generating until
// told to stop (m's context must be longer than they run meanwhile), calls
// read once every one has its first token, then stops them.
func whileGenerating(t *testing.T, m Model, n int, gap time.Duration, read func()) {
	t.Helper()
	release := make(chan struct{})
	var wg, started sync.WaitGroup
	for i := range n {
		s := newSlot(t, m)
		started.Add(1)
		wg.Go(func() {
			first := true
			_, err := s.Generate(context.Background(), Request{Prompt: testPrompt(i), MaxTokens: 2000, Seed: 1}, func(Token) error {
				if first {
					first = false
					started.Done()
				}
				select {
				case <-release:
					return ErrClosed // stop: the test is done
				default:
					return nil
				}
			})
			assert.ErrorIs(t, err, ErrClosed)
		})
		time.Sleep(gap)
	}
	started.Wait()
	read()
	close(release)
	wg.Wait()
}

// stepPasses returns the passes of a step of four sequences generating in
// l, a lane of m.
func stepPasses(t *testing.T, m Model, l *lane) []int {
	t.Helper()
	var passes []int
	whileGenerating(t, m, 4, 0, func() {
		// A step of all four: one where no prompt is fed any more.
		assert.Eventually(t, func() bool {
			l.between(func() { passes = slices.Clone(l.passes) })
			return sum(passes) == 4
		}, 10*time.Second, time.Millisecond)
	})
	return passes
}

// A lane measures its passes as it decodes; a step in which every
// sequence generates is decoded in the passes the lane's planner finds
// cheapest, and a sequence decoded in a pass of its own gives what it gives
// alone, sampled requests too.
func TestBatchedStepDecodesInTheCheapestPasses(t *testing.T) {
	_, _ = tiny(t)
	m := loadBatched(t, tinyPath, 4, 1, 2048)
	l := m.(*llamaModel).lanes[0]
	reqs := batchRequests(t, m, kernelSlack["tiny"], 4, 48)
	want := solo(t, m, reqs)

	assertSameRuns(t, reqs, want, together(m, reqs, nil), "measured passes")
	var cost []float64
	l.between(func() { cost = slices.Clone(l.planner.cost) })
	assert.Positive(t, cost[4], "a pass of the four")
	assert.Positive(t, cost[1], "a pass of one (the first measures of other widths)")

	pinPasses(l, 0, 1, 10, 10, 10)
	assert.Equal(t, []int{1, 1, 1, 1}, stepPasses(t, m, l))
	assertSameRuns(t, nil, want, together(m, reqs, nil), "passes of one")

	pinPasses(l, 0, 10, 10, 10, 1)
	assert.Equal(t, []int{4}, stepPasses(t, m, l))
	assertSameRuns(t, reqs, want, together(m, reqs, nil), "one pass")

	pinPasses(l, 0, 1, 10, 1, 10)
	passes := stepPasses(t, m, l)
	assert.ElementsMatch(t, []int{3, 1}, passes)
}
