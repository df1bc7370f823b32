package engine

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/hybridgroup/yzma/pkg/llama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testModels are the two test models, tiny and the 26 M one ("large").
func testModels(t *testing.T) []struct{ name, path string } {
	t.Helper()
	_, _ = tiny(t)
	return []struct{ name, path string }{{"tiny", tinyPath}, {"large", large(t)}}
}

// tokens is text tokenised by m as a prompt is.
func tokens(t *testing.T, m Model, text string) []llama.Token {
	t.Helper()
	ids, err := m.Tokenize(text, true)
	require.NoError(t, err)
	out := make([]llama.Token, len(ids))
	for i, id := range ids {
		out[i] = llama.Token(id)
	}
	return out
}

// A conversation sent again whole with its next turn (what chat clients
// do) decodes only what its slot's cache does not hold of it: the first
// turn's prompt and the tokens generated after it. Its text is the text a
// model with nothing cached gives, and the same request twice reuses all
// of its prompt but the last two tokens.
func TestPromptCacheServesAContinuedConversation(t *testing.T) {
	for _, mc := range testModels(t) {
		t.Run(mc.name, func(t *testing.T) {
			ctx := context.Background()
			m := loadBatched(t, mc.path, 4, 2, 512)
			fresh := loadBatched(t, mc.path, 1, 1, 512)
			first := Request{Prompt: repeatWords(300), MaxTokens: 12, Seed: 1}
			r1 := generate(ctx, newSlot(t, m), first)
			require.NoError(t, r1.err)
			assert.Zero(t, r1.res.CachedTokens, "nothing is cached before the first request")

			next := Request{Prompt: first.Prompt + r1.text + " and the queen of the hive", MaxTokens: 12, Seed: 1}
			require.Greater(t, greedyMargin(t, fresh, next), kernelSlack[mc.name], "the test's request must be robust to the kernels' rounding")
			// What the first request's partition holds: its prompt and
			// every generated token but the last, which was sampled and
			// never decoded.
			held := tokens(t, m, first.Prompt)
			for _, tok := range r1.tokens[:len(r1.tokens)-1] {
				held = append(held, llama.Token(tok.ID))
			}
			nextTokens := tokens(t, m, next.Prompt)
			shared := sharedStart(held, nextTokens)
			require.Greater(t, shared, len(tokens(t, m, first.Prompt))-2, "the next turn starts with the first turn")

			want := generate(ctx, newSlot(t, fresh), next)
			require.NoError(t, want.err)
			got := generate(ctx, newSlot(t, m), next)
			require.NoError(t, got.err)
			assert.Equal(t, shared, got.res.CachedTokens)
			assert.Equal(t, len(nextTokens), got.res.PromptTokens)
			assert.Equal(t, want.text, got.text)
			assert.Equal(t, ids(want.tokens), ids(got.tokens))

			again := generate(ctx, newSlot(t, m), next)
			require.NoError(t, again.err)
			assert.Equal(t, len(nextTokens)-2, again.res.CachedTokens, "the same request again decodes its last two prompt tokens only")
			assert.Equal(t, want.text, again.text)
			requireLanesEmpty(t, m)
		})
	}
}

// A request takes a free sequence id next to the running ones, which keeps
// them decoding in one pass; with none running, the id whose cache holds
// its start, or else one holding nothing, so that other caches stay.
func TestPromptCacheTakesTheIDThatHoldsItsStart(t *testing.T) {
	_, _ = tiny(t)
	ctx := context.Background()
	m := loadBatched(t, tinyPath, 4, 1, 512)
	l := m.(*llamaModel).lanes[0]
	heldStart := func(id int, n int) []llama.Token {
		var h []llama.Token
		l.between(func() { h = append(h, l.held[id]...) })
		return h[:min(n, len(h))]
	}

	// A request holds id 0 while a long one runs next to it, on id 1.
	release := hold(t, m, "the queen")
	long := Request{Prompt: repeatWords(400), MaxTokens: 4, Seed: 1}
	longTokens := tokens(t, m, long.Prompt)
	require.Greater(t, len(longTokens), reuseMin+2)
	r := generate(ctx, newSlot(t, m), long)
	require.NoError(t, r.err)
	assert.Equal(t, longTokens, heldStart(1, len(longTokens)), "the long request ran on id 1")
	release()
	queen := heldStart(0, 1000)
	require.NotEmpty(t, queen)

	// Every id is free now: the long prompt goes back to id 1, which
	// holds it, though id 0 was left last.
	r = generate(ctx, newSlot(t, m), long)
	require.NoError(t, r.err)
	assert.Equal(t, len(longTokens)-2, r.res.CachedTokens, "the long prompt went back to id 1")

	// A prompt that shares nothing useful takes an id holding nothing,
	// the lowest of them: both caches stay.
	short := Request{Prompt: "the bee is a hive", MaxTokens: 4, Seed: 1}
	shortTokens := tokens(t, m, short.Prompt)
	r = generate(ctx, newSlot(t, m), short)
	require.NoError(t, r.err)
	assert.Zero(t, r.res.CachedTokens)
	assert.Equal(t, shortTokens, heldStart(2, len(shortTokens)), "the short request ran on id 2")
	assert.Equal(t, longTokens, heldStart(1, len(longTokens)), "id 1 kept its cache")
	assert.Equal(t, queen, heldStart(0, 1000), "id 0 kept its cache")
}

// What a partition holds is read from the cache itself before it is
// reused: cells removed behind the lane's back (here by a test between two
// steps) are not taken for a cached prompt.
func TestPromptCacheChecksWhatThePartitionHolds(t *testing.T) {
	_, _ = tiny(t)
	ctx := context.Background()
	m := loadBatched(t, tinyPath, 1, 1, 512)
	l := m.(*llamaModel).lanes[0]
	req := Request{Prompt: repeatWords(100), MaxTokens: 8, Seed: 1}
	want := generate(ctx, newSlot(t, m), req)
	require.NoError(t, want.err)
	l.between(func() { _, _ = llama.MemorySeqRm(l.mem, 0, -1, -1) })
	got := generate(ctx, newSlot(t, m), req)
	require.NoError(t, got.err)
	assert.Zero(t, got.res.CachedTokens)
	assert.Equal(t, want.text, got.text)
}

// The cache does not change a request's text: requests sent twice, and
// after others that share some of their start, give what a model with
// nothing cached gives; greedy ones always (their margin measured), seeded
// ones counted (see reuse for why they come out the same too).
func TestPromptCacheDoesNotChangeTheText(t *testing.T) {
	for _, mc := range testModels(t) {
		t.Run(mc.name, func(t *testing.T) {
			ctx := context.Background()
			m := loadBatched(t, mc.path, 1, 1, 512)
			fresh := loadBatched(t, mc.path, 1, 1, 512)
			reqs := batchRequests(t, fresh, kernelSlack[mc.name], 16, 32)
			for i := range reqs {
				reqs[i].Prompt += repeatWords(i * 13 % 120)
			}
			cached, sampled, sampledSame := 0, 0, 0
			for i, r := range reqs {
				// A fresh model's cache holds nothing of r's prompt.
				_ = generate(ctx, newSlot(t, fresh), Request{Prompt: "queen", MaxTokens: 1, Seed: 1})
				want := generate(ctx, newSlot(t, fresh), r)
				require.NoError(t, want.err)
				for k := range 2 {
					got := generate(ctx, newSlot(t, m), r)
					require.NoError(t, got.err)
					cached += got.res.CachedTokens
					if r.Temperature != 0 {
						sampled++
						if got.text == want.text {
							sampledSame++
						}
						continue
					}
					assert.Equal(t, want.text, got.text, "request %d, time %d", i, k+1)
				}
			}
			assert.Positive(t, cached, "the cache served some of the prompts")
			t.Logf("%s: sampled requests identical with the cache and without: %d of %d", mc.name, sampledSame, sampled)
		})
	}
}

// hold starts a request on m that takes a slot and keeps it, generating,
// until the returned function is called.
func hold(t *testing.T, m Model, prompt string) (release func()) {
	t.Helper()
	holding := make(chan struct{})
	stop := make(chan struct{})
	done := make(chan error, 1)
	s := newSlot(t, m)
	go func() {
		first := true
		_, err := s.Generate(context.Background(), Request{Prompt: prompt, MaxTokens: 400, Seed: 1}, func(Token) error {
			if first {
				first = false
				close(holding)
			}
			<-stop
			return nil
		})
		done <- err
	}()
	select {
	case <-holding:
	case err := <-done:
		t.Fatalf("the holding request ended: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the holding request got no token")
	}
	return sync.OnceFunc(func() {
		close(stop)
		require.NoError(t, <-done)
	})
}

// A request goes to the lane whose cache holds its start when that spares
// it more than the other lane's lighter load: here one busy sequence
// against a prompt of a few hundred tokens.
func TestPromptCacheChoosesTheLaneThatHoldsIt(t *testing.T) {
	_, _ = tiny(t)
	ctx := context.Background()
	m := loadBatched(t, tinyPath, 8, 2, 512)
	lanes := m.(*llamaModel).lanes
	// Lane 0 keeps the long prompt at id 1 (id 0 busy while it runs).
	release0 := hold(t, m, "the queen")
	release1 := hold(t, m, "a hive")
	long := Request{Prompt: repeatWords(400), MaxTokens: 4, Seed: 1}
	longTokens := tokens(t, m, long.Prompt)
	r := generate(ctx, newSlot(t, m), long)
	require.NoError(t, r.err)
	var held []llama.Token
	lanes[0].between(func() { held = append(held, lanes[0].held[1]...) })
	require.Equal(t, longTokens, held[:len(longTokens)], "the long request ran on lane 0, id 1")
	release0()
	release1()

	// Lane 0 is busier now, but holds the prompt.
	release := hold(t, m, "the world")
	defer release()
	r = generate(ctx, newSlot(t, m), long)
	require.NoError(t, r.err)
	assert.Equal(t, len(longTokens)-2, r.res.CachedTokens, "the long prompt went back to lane 0")
}

// With every id holding something, a request that shares nothing useful
// takes the id left longest ago: a conversation that goes on keeps its
// cache while one-off requests come and go.
func TestPromptCacheKeepsWhatWasUsedLast(t *testing.T) {
	_, _ = tiny(t)
	ctx := context.Background()
	m := loadBatched(t, tinyPath, 4, 1, 512)
	oneOff := func(i int) {
		t.Helper()
		r := generate(ctx, newSlot(t, m), Request{Prompt: testPrompt(i), MaxTokens: 4, Seed: 1})
		require.NoError(t, r.err)
		require.Less(t, r.res.CachedTokens, usefulStart, "one-off %d", i)
	}
	conversation := repeatWords(200)
	// turn sends the conversation's next turn, and returns what it found
	// cached and the length of the turn before (its tail tokenises
	// otherwise once text follows it, so not all of it is shared).
	turn := func() (cached, before int) {
		t.Helper()
		before = len(tokens(t, m, conversation)) - 2
		r := generate(ctx, newSlot(t, m), Request{Prompt: conversation, MaxTokens: 8, Seed: 1})
		require.NoError(t, r.err)
		conversation += r.text + " and the queen"
		return r.res.CachedTokens, before
	}
	_, _ = turn() // id 0
	oneOff(1)     // ids 1, 2, 3: holding nothing yet
	oneOff(2)
	oneOff(3)
	_, _ = turn() // id 0 again: its cache holds the conversation
	oneOff(4)     // every id holds something: id 1, left longest ago
	oneOff(5)     // id 2
	cached, before := turn()
	assert.Greater(t, cached, before/2, "the conversation kept id 0")
}

// A new conversation that shares only its start (a system prompt) with a
// long one does not take the long one's id, which would cut its cache down
// to that start: it takes an id holding nothing, and the long one's next
// turn still finds its history cached.
func TestPromptCacheKeepsAConversationFromANewOneThatSharesItsStart(t *testing.T) {
	_, _ = tiny(t)
	ctx := context.Background()
	m := loadBatched(t, tinyPath, 4, 1, 512)
	system := repeatWords(60)
	require.GreaterOrEqual(t, len(tokens(t, m, system)), usefulStart+2)
	conversation := system + repeatWords(300)
	r := generate(ctx, newSlot(t, m), Request{Prompt: conversation, MaxTokens: 8, Seed: 1})
	require.NoError(t, r.err)
	conversation += r.text + " and the queen"

	other := generate(ctx, newSlot(t, m), Request{Prompt: system + "hello hello hello world", MaxTokens: 8, Seed: 1})
	require.NoError(t, other.err)

	before := len(tokens(t, m, conversation))
	r = generate(ctx, newSlot(t, m), Request{Prompt: conversation, MaxTokens: 8, Seed: 1})
	require.NoError(t, r.err)
	assert.Greater(t, r.res.CachedTokens, before/2, "the long conversation kept its cache")
}
