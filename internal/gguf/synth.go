package gguf

import (
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
)

// DefaultChatTemplate is a ChatML-style Jinja template. llama.cpp recognises
// it (by its <|im_start|> markers) as its built-in "chatml" template.
const DefaultChatTemplate = "{% for message in messages %}" +
	"{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}" +
	"{% endfor %}" +
	"{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

// SynthConfig describes a synthetic llama-architecture model with random
// weights.
type SynthConfig struct {
	Embd, Heads, Layers, FF, CtxLen int
	// F16 stores the matrices as F16 (norm vectors stay F32).
	F16 bool
	// Q8_0 stores the matrices, the token embedding and output ones
	// included, as Q8_0 (norm vectors stay F32); it takes precedence over
	// F16. Embd and FF must be multiples of Q8_0BlockSize.
	Q8_0 bool
	// Seed makes the weights deterministic: the same config gives the same bytes.
	Seed int64
	// ChatTemplate is written as tokenizer.chat_template when not empty.
	ChatTemplate string
}

// Tiny is the model used by tests: n_embd 64, 4 heads, 2 layers, ff 128,
// context 2048, F32, with DefaultChatTemplate.
func Tiny() SynthConfig {
	return SynthConfig{Embd: 64, Heads: 4, Layers: 2, FF: 128, CtxLen: 2048, Seed: 42, ChatTemplate: DefaultChatTemplate}
}

// Large is the model used by benchmarks: n_embd 512, 8 heads, 8 layers,
// ff 1536, context 2048, F16. A token takes milliseconds on a CPU.
func Large() SynthConfig {
	return SynthConfig{Embd: 512, Heads: 8, Layers: 8, FF: 1536, CtxLen: 2048, F16: true, Seed: 42, ChatTemplate: DefaultChatTemplate}
}

// MemoryBound is the model whose weights do not fit in a CPU's cache, for
// benchmarks of batching: n_embd 2048, 16 heads, 8 layers, ff 5632, context
// 2048, F16; 412 M parameters, 0.82 GB. Every decode step reads all of it
// from memory, and a step of several sequences reads it once for all. Its
// KV cache (F16) is 64 KiB a token. It is generated on the fly (about 9 s
// on 2 cores), never kept. F16 rather than Q8_0: on the 2-core AVX-512 VM
// of this project a ~1 GB Q8_0 model (Embd 4096, Layers 4, FF 14336) ran
// slower (25.8 against 38.1 tokens/s alone) and gained less from a batch of
// 8 (1.97× against 2.21×).
func MemoryBound() SynthConfig {
	return SynthConfig{Embd: 2048, Heads: 16, Layers: 8, FF: 5632, CtxLen: 2048, F16: true, Seed: 42, ChatTemplate: DefaultChatTemplate}
}

// Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
const (
	TokenNormal      = 1
	TokenUnknown     = 2
	TokenControl     = 3
	TokenUserDefined = 4
	TokenUnused      = 5
	TokenByte        = 6
)

// Special token ids of the synthetic vocabulary.
const (
	UnkID = 0
	BosID = 1
	EosID = 2
	// ImStartID and ImEndID are the ChatML control tokens <|im_start|> and
	// <|im_end|>; llama.cpp treats <|im_end|> as end-of-generation too.
	ImStartID = 259
	ImEndID   = 260
)

// words are the whole-word pieces of the vocabulary. SentencePiece merges
// pairs of existing pieces, so every prefix of a piece is added too.
var words = []string{
	"▁the", "▁and", "▁of", "▁to", "▁in", "▁is", "▁it", "▁a", "▁hello", "▁world",
	"▁you", "▁we", "▁be", "▁at", "▁on", "▁as", "▁or", "▁bee", "▁hi",
}

// Vocab returns the synthetic SentencePiece-style vocabulary: tokens, scores
// and token types, with <unk>, <s>, </s> at ids 0, 1, 2, then the 256 byte
// tokens <0x00>..<0xFF>, then <|im_start|> and <|im_end|> (control), then
// word pieces.
func Vocab() (tokens []string, scores []float32, types []int32) {
	add := func(t string, s float32, typ int32) {
		tokens = append(tokens, t)
		scores = append(scores, s)
		types = append(types, typ)
	}
	add("<unk>", 0, TokenUnknown)
	add("<s>", 0, TokenControl)
	add("</s>", 0, TokenControl)
	for b := 0; b < 256; b++ {
		add(fmt.Sprintf("<0x%02X>", b), 0, TokenByte)
	}
	add("<|im_start|>", 0, TokenControl)
	add("<|im_end|>", 0, TokenControl)
	seen := map[string]bool{}
	var pieces []string
	addPiece := func(p string) {
		if !seen[p] {
			seen[p] = true
			pieces = append(pieces, p)
		}
	}
	addPiece("▁")
	for _, c := range "etaoinshrdlucmwyb" {
		addPiece(string(c))
	}
	for _, w := range words {
		r := []rune(w)
		for i := 2; i <= len(r); i++ {
			addPiece(string(r[:i]))
		}
	}
	for _, p := range []string{"er", "in", "on", "th", "he", "an", "re", "ing", ".", ",", "!", "?"} {
		addPiece(p)
	}
	// Longer pieces score higher so that SentencePiece prefers them.
	for i, p := range pieces {
		add(p, float32(len([]rune(p)))-float32(i)/1000, TokenNormal)
	}
	return tokens, scores, types
}

func (c SynthConfig) validate() error {
	switch {
	case c.Embd <= 0 || c.Heads <= 0 || c.Layers <= 0 || c.FF <= 0 || c.CtxLen <= 0:
		return fmt.Errorf("gguf: synth config %+v: all sizes must be positive", c)
	case c.Embd%c.Heads != 0:
		return fmt.Errorf("gguf: synth config: embd %d not divisible by heads %d", c.Embd, c.Heads)
	case (c.Embd/c.Heads)%2 != 0:
		return fmt.Errorf("gguf: synth config: head size %d must be even for RoPE", c.Embd/c.Heads)
	case c.Q8_0 && (c.Embd%Q8_0BlockSize != 0 || c.FF%Q8_0BlockSize != 0):
		return fmt.Errorf("gguf: synth config: Q8_0 needs embd %d and ff %d to be multiples of %d", c.Embd, c.FF, Q8_0BlockSize)
	}
	return nil
}

// WeightType is the type the config's matrices are stored as: "F32", "F16"
// or "Q8_0".
func (c SynthConfig) WeightType() string {
	switch {
	case c.Q8_0:
		return "Q8_0"
	case c.F16:
		return "F16"
	}
	return "F32"
}

// shapes are the dimensions of the model's tensors in the order Synth
// writes them; 1-D ones are the norm vectors.
func (c SynthConfig) shapes() [][]uint64 {
	tokens, _, _ := Vocab()
	E, F, V := uint64(c.Embd), uint64(c.FF), uint64(len(tokens))
	s := [][]uint64{{E, V}}
	for l := 0; l < c.Layers; l++ {
		s = append(s, []uint64{E}, []uint64{E, E}, []uint64{E, E}, []uint64{E, E}, []uint64{E, E},
			[]uint64{E}, []uint64{E, F}, []uint64{E, F}, []uint64{F, E})
	}
	return append(s, []uint64{E}, []uint64{E, V})
}

// elements is the number of values of a tensor of shape d.
func elements(d []uint64) int64 {
	p := int64(1)
	for _, x := range d {
		p *= int64(x)
	}
	return p
}

// Params is the number of weights of the model Synth writes for c.
func (c SynthConfig) Params() int64 {
	var n int64
	for _, d := range c.shapes() {
		p := elements(d)
		n += p
	}
	return n
}

// TensorBytes is the size of the model's tensor data as stored, alignment
// padding included: the file less its header (metadata and tensor infos,
// about 10 KB).
func (c SynthConfig) TensorBytes() int64 {
	var n int64
	for _, d := range c.shapes() {
		p := elements(d)
		switch {
		case len(d) == 1:
			p *= 4
		case c.Q8_0:
			p = p / Q8_0BlockSize * Q8_0BlockBytes
		case c.F16:
			p *= 2
		default:
			p *= 4
		}
		n += int64(align(uint64(p), DefaultAlignment))
	}
	return n
}

// rng is a small deterministic generator (PCG from math/rand/v2, whose output
// stream is specified), turned into uniform floats without relying on any
// library distribution code that could change between Go versions.
type rng struct{ p *rand.PCG }

func (r rng) uniform(scale float32) float32 {
	u := float64(r.p.Uint64()>>11) / (1 << 53)
	return float32((2*u - 1) * float64(scale))
}

func (r rng) fill(n int, scale float32) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = r.uniform(scale)
	}
	return out
}

// Synth writes a random-weight llama model described by cfg to w.
func Synth(w io.Writer, cfg SynthConfig) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	tokens, scores, types := Vocab()
	nVocab := len(tokens)
	g := NewWriter()
	g.AddString("general.architecture", "llama")
	g.AddString("general.name", fmt.Sprintf("rbee-synth-%dx%d", cfg.Embd, cfg.Layers))
	// general.file_type is llama.cpp's llama_ftype: ALL_F32, MOSTLY_F16,
	// MOSTLY_Q8_0.
	fileType := uint32(0)
	switch {
	case cfg.Q8_0:
		fileType = 7
	case cfg.F16:
		fileType = 1
	}
	g.AddUint32("general.file_type", fileType)
	g.AddUint32("llama.context_length", uint32(cfg.CtxLen))
	g.AddUint32("llama.embedding_length", uint32(cfg.Embd))
	g.AddUint32("llama.block_count", uint32(cfg.Layers))
	g.AddUint32("llama.feed_forward_length", uint32(cfg.FF))
	g.AddUint32("llama.attention.head_count", uint32(cfg.Heads))
	g.AddUint32("llama.attention.head_count_kv", uint32(cfg.Heads))
	g.AddFloat32("llama.attention.layer_norm_rms_epsilon", 1e-5)
	g.AddFloat32("llama.rope.freq_base", 10000)
	g.AddUint32("llama.rope.dimension_count", uint32(cfg.Embd/cfg.Heads))
	g.AddUint32("llama.vocab_size", uint32(nVocab))
	g.AddString("tokenizer.ggml.model", "llama")
	g.AddStringArray("tokenizer.ggml.tokens", tokens)
	g.AddFloat32Array("tokenizer.ggml.scores", scores)
	g.AddInt32Array("tokenizer.ggml.token_type", types)
	g.AddUint32("tokenizer.ggml.unknown_token_id", UnkID)
	g.AddUint32("tokenizer.ggml.bos_token_id", BosID)
	g.AddUint32("tokenizer.ggml.eos_token_id", EosID)
	g.AddBool("tokenizer.ggml.add_bos_token", true)
	g.AddBool("tokenizer.ggml.add_eos_token", false)
	if cfg.ChatTemplate != "" {
		g.AddString("tokenizer.chat_template", cfg.ChatTemplate)
	}

	r := rng{rand.NewPCG(uint64(cfg.Seed), uint64(cfg.Seed)^0x9e3779b97f4a7c15)}
	E, F, V := uint64(cfg.Embd), uint64(cfg.FF), uint64(nVocab)
	addMatrix := func(name string, dims []uint64, data []float32) {
		switch {
		case cfg.Q8_0:
			g.AddTensorQ8_0(name, dims, data)
		case cfg.F16:
			g.AddTensorF16(name, dims, data)
		default:
			g.AddTensorF32(name, dims, data)
		}
	}
	matrix := func(name string, dims []uint64, scale float32) {
		addMatrix(name, dims, r.fill(int(dims[0]*dims[1]), scale))
	}
	norm := func(name string) {
		v := make([]float32, E)
		for i := range v {
			v[i] = 1 + r.uniform(0.1)
		}
		g.AddTensorF32(name, []uint64{E}, v)
	}
	// Uniform(-a, a) has standard deviation a/sqrt(3); a = sqrt(3/fan_in)
	// keeps activations of unit size through the layers.
	inv := func(fanIn uint64) float32 { return float32(math.Sqrt(3 / float64(fanIn))) }
	matrix("token_embd.weight", []uint64{E, V}, 1)
	for l := 0; l < cfg.Layers; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		norm(p + "attn_norm.weight")
		matrix(p+"attn_q.weight", []uint64{E, E}, inv(E))
		matrix(p+"attn_k.weight", []uint64{E, E}, inv(E))
		matrix(p+"attn_v.weight", []uint64{E, E}, inv(E))
		matrix(p+"attn_output.weight", []uint64{E, E}, inv(E))
		norm(p + "ffn_norm.weight")
		matrix(p+"ffn_gate.weight", []uint64{E, F}, inv(E))
		matrix(p+"ffn_up.weight", []uint64{E, F}, inv(E))
		matrix(p+"ffn_down.weight", []uint64{F, E}, inv(F))
	}
	norm("output_norm.weight")
	// Logits of a few units: the output is peaked enough to be readable
	// under greedy decoding and varied enough under sampling.
	// Rows of tokens that make unreadable text (control tokens and bytes
	// outside printable ASCII) are damped so that output is mostly words and
	// ASCII; </s> is damped less so that sampling ends now and then.
	out := r.fill(int(E*V), 3*inv(E))
	for v := 0; v < int(V); v++ {
		damp := float32(1)
		switch {
		case v == EosID:
			damp = 0.6
		case types[v] == TokenControl || types[v] == TokenUnknown:
			damp = 0.1
		case types[v] == TokenByte && (v-3 < 0x20 || v-3 > 0x7e) && v-3 != '\n':
			damp = 0.3
		}
		for i := 0; i < int(E); i++ {
			out[v*int(E)+i] *= damp
		}
	}
	addMatrix("output.weight", []uint64{E, V}, out)
	_, err := g.WriteTo(w)
	return err
}

// SynthFile writes the model to path atomically: to a temporary file in the
// same directory, then renamed.
func SynthFile(path string, cfg SynthConfig) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if err = Synth(f, cfg); err != nil {
		return err
	}
	if err = f.Chmod(0o644); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(f.Name(), path); err != nil {
		return errors.Join(err, os.Remove(f.Name()))
	}
	return nil
}
