package engine

import (
	"bytes"
	"context"
	"errors"
	"flag"

	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/internal/gguf"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

const goldenPrompt = "hello world, the bee is"

var (
	setupOnce sync.Once
	setupErr  error
	tinyPath  string
	testEng   *Llama
	tinyModel Model
	modelDir  string
)

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "rbee-engine-test")
	if err != nil {
		panic(err)
	}
	modelDir = dir
	code := m.Run()
	if tinyModel != nil {
		_ = tinyModel.Close()
	}
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// tiny returns the engine and the shared Tiny model (loaded once, 1 thread).
// It fails the test with llamalib's instructions when the libraries are
// missing.
func tiny(t testing.TB) (*Llama, Model) {
	t.Helper()
	setupOnce.Do(func() {
		testEng, setupErr = NewLlama("")
		if setupErr != nil {
			return
		}
		tinyPath = filepath.Join(modelDir, "tiny.gguf")
		if setupErr = gguf.SynthFile(tinyPath, gguf.Tiny()); setupErr != nil {
			return
		}
		tinyModel, setupErr = testEng.Load(context.Background(), tinyPath, LoadOptions{Threads: 1, ContextSize: 512})
	})
	if setupErr != nil {
		t.Fatalf("engine setup: %v", setupErr)
	}
	return testEng, tinyModel
}

func newSlot(t testing.TB, m Model) Slot {
	t.Helper()
	s, err := m.NewSlot()
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

type run struct {
	text   string
	tokens []Token
	res    Result
	err    error
}

func generate(ctx context.Context, s Slot, req Request) run {
	var r run
	var b strings.Builder
	r.res, r.err = s.Generate(ctx, req, func(tok Token) error {
		r.tokens = append(r.tokens, tok)
		b.WriteString(tok.Text)
		return nil
	})
	r.text = b.String()
	return r
}

func greedy(n int) Request {
	return Request{Prompt: goldenPrompt, MaxTokens: n, Seed: 1}
}

func TestGoldenGreedy(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	r := generate(context.Background(), s, greedy(32))
	require.NoError(t, r.err)
	golden := filepath.Join("testdata", "tiny_greedy.golden")
	if *update {
		require.NoError(t, os.WriteFile(golden, []byte(r.text), 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err, "run with -update to create the golden file")
	assert.Equal(t, string(want), r.text)
	assert.Equal(t, StopMaxTokens, r.res.StopReason)
	assert.Equal(t, 32, r.res.CompletionTokens)
	assert.Len(t, r.tokens, 32)
	for i, tok := range r.tokens {
		assert.Equal(t, i, tok.Index)
	}
	assert.Greater(t, r.res.PromptTokens, 1)
	assert.Positive(t, r.res.TimeToFirstToken)
	assert.GreaterOrEqual(t, r.res.Duration, r.res.TimeToFirstToken)

	// The slot is reusable and the result repeatable.
	again := generate(context.Background(), s, greedy(32))
	require.NoError(t, again.err)
	assert.Equal(t, r.text, again.text)
	assert.Equal(t, r.tokens, again.tokens)
}

func TestSamplingRepeatableWithSeed(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	req := Request{Prompt: goldenPrompt, MaxTokens: 24, Temperature: 0.9, TopK: 40, TopP: 0.95, MinP: 0.05, RepeatPenalty: 1.1, Seed: 7}
	a := generate(context.Background(), s, req)
	b := generate(context.Background(), s, req)
	require.NoError(t, a.err)
	require.NoError(t, b.err)
	assert.Equal(t, a.tokens, b.tokens)
	req.Seed = 8
	c := generate(context.Background(), s, req)
	require.NoError(t, c.err)
	assert.NotEqual(t, a.tokens, c.tokens, "another seed, other tokens")
}

func TestCancelAfterFirstToken(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	n := 0
	res, err := s.Generate(ctx, greedy(100), func(Token) error {
		n++
		cancel()
		return nil
	})
	require.NoError(t, err)
	assert.Equal(t, StopCancelled, res.StopReason)
	assert.Equal(t, 1, n)
	assert.Equal(t, 1, res.CompletionTokens)

	// Cancelled before starting: no tokens at all.
	res, err = s.Generate(ctx, greedy(10), func(Token) error { t.Error("token after cancel"); return nil })
	require.NoError(t, err)
	assert.Equal(t, StopCancelled, res.StopReason)

	// And the slot still works afterwards.
	r := generate(context.Background(), s, greedy(32))
	require.NoError(t, r.err)
	want, _ := os.ReadFile(filepath.Join("testdata", "tiny_greedy.golden"))
	assert.Equal(t, string(want), r.text)
}

func TestCallbackErrorStops(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	boom := errors.New("boom")
	n := 0
	res, err := s.Generate(context.Background(), greedy(10), func(Token) error { n++; return boom })
	assert.ErrorIs(t, err, boom)
	assert.Equal(t, StopError, res.StopReason)
	assert.Equal(t, 1, n)
}

func TestMaxTokens(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	for _, n := range []int{1, 5} {
		r := generate(context.Background(), s, greedy(n))
		require.NoError(t, r.err)
		assert.Equal(t, StopMaxTokens, r.res.StopReason)
		assert.Equal(t, n, r.res.CompletionTokens)
	}
}

func TestEOS(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	// The synthetic model rarely ends on its own; hot sampling over a few
	// fixed seeds reaches </s> deterministically.
	for seed := uint32(1); seed <= 200; seed++ {
		r := generate(context.Background(), s, Request{Prompt: goldenPrompt, MaxTokens: 256, Temperature: 2, Seed: seed})
		require.NoError(t, r.err)
		if r.res.StopReason != StopEOS {
			continue
		}
		last := r.tokens[len(r.tokens)-1]
		assert.Contains(t, []int32{gguf.EosID, gguf.ImEndID}, last.ID, "the end-of-generation token is reported last")
		assert.Equal(t, len(r.tokens), r.res.CompletionTokens)
		t.Logf("seed %d ends after %d tokens", seed, len(r.tokens))
		return
	}
	t.Fatal("no seed reached </s>")
}

func TestContextFull(t *testing.T) {
	eng, _ := tiny(t)
	m, err := eng.Load(context.Background(), tinyPath, LoadOptions{Threads: 1, ContextSize: 32})
	require.NoError(t, err)
	defer m.Close()
	s := newSlot(t, m)
	req := greedy(32)
	r := generate(context.Background(), s, req)
	require.NoError(t, r.err)
	assert.Equal(t, StopMaxTokens, r.res.StopReason)
	assert.LessOrEqual(t, r.res.PromptTokens+r.res.CompletionTokens, 32+1)
	assert.Less(t, r.res.CompletionTokens, 32)
}

func TestStopSequence(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	full := generate(context.Background(), s, greedy(32))
	require.NoError(t, full.err)
	require.GreaterOrEqual(t, len(full.text), 12)
	// A stop sequence that spans several tokens, taken from the middle of
	// the golden output.
	var stop string
	at := -1
	for i := 4; i+6 <= len(full.text) && at < 0; i++ {
		cand := full.text[i : i+6]
		if strings.Index(full.text, cand) == i {
			stop, at = cand, i
		}
	}
	require.GreaterOrEqual(t, at, 0)
	req := greedy(32)
	req.Stop = []string{"never-appears", stop}
	r := generate(context.Background(), s, req)
	require.NoError(t, r.err)
	assert.Equal(t, StopSequence, r.res.StopReason)
	assert.Equal(t, full.text[:at], r.text, "output ends right before the stop sequence %q", stop)
	assert.Less(t, r.res.CompletionTokens, 32)

	// A stop string that never appears changes nothing.
	req.Stop = []string{"zzzzqqq"}
	r = generate(context.Background(), s, req)
	require.NoError(t, r.err)
	assert.Equal(t, full.text, r.text)
	assert.Equal(t, StopMaxTokens, r.res.StopReason)
}

func TestBadParameters(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	ok := greedy(4)
	cases := map[string]func(r *Request){
		"prompt":         func(r *Request) { r.Prompt = "" },
		"max_tokens":     func(r *Request) { r.MaxTokens = 0 },
		"temperature":    func(r *Request) { r.Temperature = 2.5 },
		"top_p":          func(r *Request) { r.TopP = 1.5 },
		"top_k":          func(r *Request) { r.TopK = -1 },
		"min_p":          func(r *Request) { r.MinP = -0.1 },
		"repeat_penalty": func(r *Request) { r.RepeatPenalty = -1 },
		"stop":           func(r *Request) { r.Stop = []string{""} },
		"prompt ":        func(r *Request) { r.Prompt = "a\x00b" },
	}
	for field, mutate := range cases {
		req := ok
		mutate(&req)
		_, err := s.Generate(context.Background(), req, nil)
		require.Error(t, err, field)
		assert.ErrorIs(t, err, ErrInvalidRequest, field)
		var pe *ParamError
		require.ErrorAs(t, err, &pe, field)
		assert.Equal(t, strings.TrimSpace(field), pe.Field)
		assert.Contains(t, err.Error(), strings.TrimSpace(field))
	}
	req := ok
	req.MaxTokens = m.ContextSize() + 1
	assert.ErrorContains(t, req.Validate(m.ContextSize()), "max_tokens")

	// A prompt longer than the context.
	req = ok
	req.Prompt = strings.Repeat("hello ", m.ContextSize())
	_, err := s.Generate(context.Background(), req, nil)
	assert.ErrorIs(t, err, ErrPromptTooLong)
	assert.ErrorIs(t, err, ErrInvalidRequest)
	assert.ErrorContains(t, err, "prompt")
}

func TestCorruptModels(t *testing.T) {
	eng, _ := tiny(t)
	dir := t.TempDir()
	good, err := os.ReadFile(tinyPath)
	require.NoError(t, err)
	rnd := make([]byte, 4096)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range rnd {
		rnd[i] = byte(rng.Uint32())
	}
	// GGUF magic followed by garbage.
	magicGarbage := append([]byte("GGUF"), rnd...)
	// A valid header claiming absurd counts.
	badCounts := append([]byte(nil), good[:64]...)
	for i := 8; i < 24; i++ {
		badCounts[i] = 0xff
	}
	files := map[string][]byte{
		"truncated-half.gguf":   good[:len(good)/2],
		"truncated-header.gguf": good[:1000],
		"truncated-tiny.gguf":   good[:10],
		"random.gguf":           rnd,
		"magic-garbage.gguf":    magicGarbage,
		"bad-counts.gguf":       badCounts,
		"empty.gguf":            nil,
	}
	// Well-formed GGUF files that llama.cpp itself must refuse.
	wellFormed := func(arch string, withTensors bool) []byte {
		w := gguf.NewWriter()
		w.AddString("general.architecture", arch)
		w.AddUint32(arch+".context_length", 128)
		if withTensors {
			w.AddTensorF32("token_embd.weight", []uint64{4, 2}, make([]float32, 8))
		} else {
			w.AddTensorF32("foo", []uint64{1}, []float32{1})
		}
		var b bytes.Buffer
		_, err := w.WriteTo(&b)
		require.NoError(t, err)
		return b.Bytes()
	}
	files["unknown-arch.gguf"] = wellFormed("nosucharch", false)
	files["missing-tensors.gguf"] = wellFormed("llama", true)
	for name, data := range files {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, data, 0o644))
		m, err := eng.Load(context.Background(), p, LoadOptions{Threads: 1})
		if !assert.Error(t, err, name) {
			_ = m.Close()
			continue
		}
		assert.ErrorIs(t, err, ErrLoad, name)
		assert.Contains(t, err.Error(), p, name)
		t.Logf("%s: %v", name, err)
	}
	_, err = eng.Load(context.Background(), filepath.Join(dir, "missing.gguf"), LoadOptions{})
	assert.ErrorIs(t, err, ErrLoad)
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestTwoSlotsConcurrently(t *testing.T) {
	_, m := tiny(t)
	reqs := []Request{greedy(32), {Prompt: "the world is", MaxTokens: 32, Temperature: 0.8, Seed: 3}}
	// Serially, on one slot.
	s0 := newSlot(t, m)
	serial := make([]run, len(reqs))
	for i, req := range reqs {
		serial[i] = generate(context.Background(), s0, req)
		require.NoError(t, serial[i].err)
	}
	// Concurrently, one goroutine per slot, a few times over.
	slots := []Slot{newSlot(t, m), newSlot(t, m)}
	for round := 0; round < 3; round++ {
		got := make([]run, len(reqs))
		var wg sync.WaitGroup
		for i := range reqs {
			wg.Go(func() { got[i] = generate(context.Background(), slots[i], reqs[i]) })
		}
		wg.Wait()
		for i := range reqs {
			require.NoError(t, got[i].err)
			assert.Equal(t, serial[i].text, got[i].text, "request %d round %d", i, round)
			assert.Equal(t, serial[i].tokens, got[i].tokens)
		}
	}
}

func TestSlotBusy(t *testing.T) {
	_, m := tiny(t)
	s := newSlot(t, m)
	started := make(chan struct{})
	release := make(chan struct{})
	done := make(chan error)
	go func() {
		_, err := s.Generate(context.Background(), greedy(3), func(tok Token) error {
			if tok.Index == 0 {
				close(started)
				<-release
			}
			return nil
		})
		done <- err
	}()
	<-started
	_, err := s.Generate(context.Background(), greedy(3), nil)
	assert.ErrorIs(t, err, ErrSlotBusy)
	close(release)
	require.NoError(t, <-done)
}

func TestApplyChatTemplate(t *testing.T) {
	_, m := tiny(t)
	out, err := m.ApplyChatTemplate([]ChatMessage{
		{Role: "system", Content: "You are a bee."},
		{Role: "user", Content: "hello"},
	}, true)
	require.NoError(t, err)
	assert.Equal(t, "<|im_start|>system\nYou are a bee.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", out)
	out, err = m.ApplyChatTemplate([]ChatMessage{{Role: "user", Content: "hi"}}, false)
	require.NoError(t, err)
	assert.Equal(t, "<|im_start|>user\nhi<|im_end|>\n", out)

	// Control-token text becomes control tokens.
	toks, err := m.Tokenize("<|im_start|>user", false)
	require.NoError(t, err)
	tokens, _, _ := gguf.Vocab()
	require.NotEmpty(t, toks)
	assert.Equal(t, "<|im_start|>", tokens[toks[0]])

	// The rendered prompt generates.
	s := newSlot(t, m)
	r := generate(context.Background(), s, Request{Prompt: out, MaxTokens: 4})
	require.NoError(t, r.err)
}

func TestNoChatTemplate(t *testing.T) {
	eng, _ := tiny(t)
	cfg := gguf.Tiny()
	cfg.ChatTemplate = ""
	p := filepath.Join(t.TempDir(), "notemplate.gguf")
	require.NoError(t, gguf.SynthFile(p, cfg))
	m, err := eng.Load(context.Background(), p, LoadOptions{Threads: 1, ContextSize: 256})
	require.NoError(t, err)
	defer m.Close()
	_, err = m.ApplyChatTemplate([]ChatMessage{{Role: "user", Content: "hi"}}, true)
	assert.ErrorIs(t, err, ErrNoChatTemplate)
}

func TestTokenize(t *testing.T) {
	_, m := tiny(t)
	toks, err := m.Tokenize("hello world", true)
	require.NoError(t, err)
	tokens, _, _ := gguf.Vocab()
	var got []string
	for _, id := range toks {
		got = append(got, tokens[id])
	}
	assert.Equal(t, []string{"<s>", "▁hello", "▁world"}, got)
	toks, err = m.Tokenize("hello", false)
	require.NoError(t, err)
	assert.Len(t, toks, 1)
	assert.Equal(t, 512, m.ContextSize())
	_, err = m.Tokenize("nul\x00byte", true)
	assert.ErrorIs(t, err, ErrInvalidRequest)
}

func TestCloseModel(t *testing.T) {
	eng, _ := tiny(t)
	m, err := eng.Load(context.Background(), tinyPath, LoadOptions{Threads: 1, ContextSize: 128})
	require.NoError(t, err)
	s, err := m.NewSlot()
	require.NoError(t, err)
	require.NoError(t, m.Close())
	require.NoError(t, m.Close())
	_, err = m.NewSlot()
	assert.ErrorIs(t, err, ErrClosed)
	_, err = m.Tokenize("x", true)
	assert.ErrorIs(t, err, ErrClosed)
	_, err = s.Generate(context.Background(), greedy(2), nil)
	assert.ErrorIs(t, err, ErrClosed)
	assert.NoError(t, s.Close())
}

func TestBadDevice(t *testing.T) {
	eng, _ := tiny(t)
	for _, dev := range []string{"tpu", "cuda:x", "cuda:-1", "cuda:99"} {
		_, err := eng.Load(context.Background(), tinyPath, LoadOptions{Device: dev})
		assert.ErrorIs(t, err, ErrDevice, dev)
	}
}

func TestNewLlamaOtherDirRefused(t *testing.T) {
	eng, _ := tiny(t)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "libllama.so"), nil, 0o644))
	_, err := NewLlama(dir)
	assert.ErrorIs(t, err, ErrLibrary)
	again, err := NewLlama(eng.LibDir())
	require.NoError(t, err)
	assert.Equal(t, eng.LibDir(), again.LibDir())
	_, err = NewLlama(filepath.Join(dir, "nope"))
	assert.ErrorIs(t, err, ErrLibrary)
	assert.ErrorContains(t, err, "llama-libs.sh")
}

// BenchmarkGenerate reports generated tokens per second with 1 thread.
func BenchmarkGenerate(b *testing.B) {
	eng, _ := tiny(b)
	for _, c := range []struct {
		name string
		cfg  gguf.SynthConfig
	}{{"Tiny", gguf.Tiny()}, {"Large", gguf.Large()}} {
		b.Run(c.name, func(b *testing.B) {
			p := filepath.Join(modelDir, strings.ToLower(c.name)+"-bench.gguf")
			if _, err := os.Stat(p); err != nil {
				require.NoError(b, gguf.SynthFile(p, c.cfg))
			}
			m, err := eng.Load(context.Background(), p, LoadOptions{Threads: 1, ContextSize: 512})
			require.NoError(b, err)
			defer m.Close()
			s, err := m.NewSlot()
			require.NoError(b, err)
			defer s.Close()
			const n = 64
			req := Request{Prompt: goldenPrompt, MaxTokens: n, Seed: 1}
			tokens := 0
			var gen time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				res, err := s.Generate(context.Background(), req, nil)
				if err != nil {
					b.Fatal(err)
				}
				tokens += res.CompletionTokens
				gen += res.Duration - res.TimeToFirstToken
			}
			b.ReportMetric(float64(tokens)/b.Elapsed().Seconds(), "tokens/s")
			if gen > 0 {
				b.ReportMetric(float64(tokens-b.N)/gen.Seconds(), "gen-tokens/s")
			}
		})
	}
}

// mapsFile says whether this process maps path (its /proc/self/maps).
func mapsFile(t *testing.T, path string) bool {
	t.Helper()
	maps, err := os.ReadFile("/proc/self/maps")
	require.NoError(t, err)
	return strings.Contains(string(maps), path)
}

// Resident weights are read into the process's memory: the model file is
// not mapped once loaded, where llama.cpp's default maps it, and the text
// is the same.
func TestResidentWeightsAreNotAMappingOfTheFile(t *testing.T) {
	eng, shared := tiny(t)
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, gguf.SynthFile(path, gguf.Tiny()))
	want := generate(context.Background(), newSlot(t, shared), greedy(32))
	require.NoError(t, want.err)

	for _, resident := range []bool{false, true} {
		m, err := eng.Load(context.Background(), path, LoadOptions{Threads: 1, ContextSize: 512, Resident: resident})
		require.NoError(t, err)
		require.Equal(t, !resident, mapsFile(t, path), "the file is mapped unless the weights are resident (resident: %v)", resident)
		s, err := m.NewSlot()
		require.NoError(t, err)
		got := generate(context.Background(), s, greedy(32))
		require.NoError(t, got.err)
		require.Equal(t, want.text, got.text, "resident: %v", resident)
		_ = s.Close()
		require.NoError(t, m.Close())
		require.False(t, mapsFile(t, path), "a closed model maps nothing")
	}
}
