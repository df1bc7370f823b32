package gguf

import (
	"bytes"
	"crypto/sha256"
	"math"
	"os"
	"path/filepath"
	"testing"

	parser "github.com/gpustack/gguf-parser-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func parse(t *testing.T, path string) *parser.GGUFFile {
	t.Helper()
	gf, err := parser.ParseGGUFFile(path)
	require.NoError(t, err)
	return gf
}

func TestWriterAllTypes(t *testing.T) {
	w := NewWriter()
	w.AddString("s", "hello")
	w.AddUint8("u8", 200)
	w.AddInt8("i8", -5)
	w.AddUint16("u16", 60000)
	w.AddInt16("i16", -300)
	w.AddUint32("u32", 4000000000)
	w.AddInt32("i32", -70000)
	w.AddUint64("u64", 1<<40)
	w.AddInt64("i64", -(1 << 40))
	w.AddFloat32("f32", 1.5)
	w.AddFloat64("f64", -2.25)
	w.AddBool("b", true)
	w.AddStringArray("as", []string{"a", "", "▁c"})
	w.AddFloat32Array("af", []float32{0.5, -1})
	w.AddInt32Array("ai", []int32{1, -2, 3})
	w.AddTensorF32("t32", []uint64{3, 2}, []float32{1, 2, 3, 4, 5, 6})
	w.AddTensorF16("t16", []uint64{5}, []float32{1, 2, 3, 4, 5})
	path := filepath.Join(t.TempDir(), "x.gguf")
	var buf bytes.Buffer
	n, err := w.WriteTo(&buf)
	require.NoError(t, err)
	assert.Equal(t, int64(buf.Len()), n)
	assert.Zero(t, buf.Len()%DefaultAlignment, "file ends aligned")
	require.NoError(t, os.WriteFile(path, buf.Bytes(), 0o644))

	gf := parse(t, path)
	assert.EqualValues(t, 3, gf.Header.Version)
	kv := gf.Header.MetadataKV
	get := func(k string) parser.GGUFMetadataKV {
		v, ok := kv.Get(k)
		require.True(t, ok, k)
		return v
	}
	assert.EqualValues(t, DefaultAlignment, get("general.alignment").ValueUint32())
	assert.Equal(t, "hello", get("s").ValueString())
	assert.EqualValues(t, 200, get("u8").ValueUint8())
	assert.EqualValues(t, -5, get("i8").ValueInt8())
	assert.EqualValues(t, 60000, get("u16").ValueUint16())
	assert.EqualValues(t, -300, get("i16").ValueInt16())
	assert.EqualValues(t, uint32(4000000000), get("u32").ValueUint32())
	assert.EqualValues(t, -70000, get("i32").ValueInt32())
	assert.EqualValues(t, uint64(1<<40), get("u64").ValueUint64())
	assert.EqualValues(t, -(1 << 40), get("i64").ValueInt64())
	assert.Equal(t, float32(1.5), get("f32").ValueFloat32())
	assert.Equal(t, -2.25, get("f64").ValueFloat64())
	assert.True(t, get("b").ValueBool())
	assert.Equal(t, []string{"a", "", "▁c"}, get("as").ValueArray().ValuesString())
	assert.Equal(t, []float32{0.5, -1}, get("af").ValueArray().ValuesFloat32())
	assert.Equal(t, []int32{1, -2, 3}, get("ai").ValueArray().ValuesInt32())

	require.Len(t, gf.TensorInfos, 2)
	assert.Equal(t, "t32", gf.TensorInfos[0].Name)
	assert.Equal(t, []uint64{3, 2}, gf.TensorInfos[0].Dimensions)
	assert.EqualValues(t, 0, gf.TensorInfos[0].Offset)
	assert.EqualValues(t, TensorF16, gf.TensorInfos[1].Type)
	assert.EqualValues(t, 32, gf.TensorInfos[1].Offset, "second tensor aligned")
	assert.Zero(t, gf.TensorDataStartOffset%DefaultAlignment)
}

func TestWriterErrors(t *testing.T) {
	w := NewWriter()
	w.AddString("k", "v")
	w.AddString("k", "again")
	_, err := w.WriteTo(&bytes.Buffer{})
	assert.ErrorContains(t, err, "duplicate")

	w = NewWriter()
	w.AddTensorF32("t", []uint64{2, 2}, []float32{1, 2, 3})
	_, err = w.WriteTo(&bytes.Buffer{})
	assert.ErrorContains(t, err, "4 elements")
}

func TestFloat16(t *testing.T) {
	cases := map[float32]uint16{
		0: 0, 1: 0x3c00, -2: 0xc000, 0.5: 0x3800, 65504: 0x7bff, 1e6: 0x7c00,
		float32(math.Inf(-1)): 0xfc00, 5.960464477539063e-08: 0x0001, 6.103515625e-05: 0x0400,
		1.0009765625: 0x3c01, 1.00048828125: 0x3c00, // tie rounds to even
	}
	for f, want := range cases {
		assert.Equal(t, want, Float32ToFloat16(f), "%g", f)
	}
	assert.Equal(t, uint16(0x7e00), Float32ToFloat16(float32(math.NaN()))&0x7e00)
}

func TestSynthTinyParses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	cfg := Tiny()
	require.NoError(t, SynthFile(path, cfg))
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), st.Mode().Perm())

	gf := parse(t, path)
	arch := gf.Architecture()
	assert.Equal(t, "llama", arch.Architecture)
	assert.EqualValues(t, 64, arch.EmbeddingLength)
	assert.EqualValues(t, 2, arch.BlockCount)
	assert.EqualValues(t, 2048, arch.MaximumContextLength)
	assert.EqualValues(t, 4, arch.AttentionHeadCount)
	assert.EqualValues(t, 2+9*cfg.Layers+1, gf.Header.TensorCount)
	assert.Len(t, gf.TensorInfos, 2+9*cfg.Layers+1)

	tok := gf.Tokenizer()
	assert.Equal(t, "llama", tok.Model)
	tokens, _, types := Vocab()
	assert.EqualValues(t, len(tokens), tok.TokensLength)
	assert.InDelta(t, 320, len(tokens), 15)
	assert.EqualValues(t, BosID, tok.BOSTokenID)
	assert.EqualValues(t, EosID, tok.EOSTokenID)
	assert.EqualValues(t, UnkID, tok.UnknownTokenID)
	assert.Equal(t, "<0x0A>", tokens[3+'\n'])
	assert.EqualValues(t, TokenByte, types[3+0xff])
	assert.Equal(t, "<|im_start|>", tokens[ImStartID])
	assert.Equal(t, "<|im_end|>", tokens[ImEndID])
	assert.EqualValues(t, TokenControl, types[ImEndID])

	kv := gf.Header.MetadataKV
	tmpl, ok := kv.Get("tokenizer.chat_template")
	require.True(t, ok)
	assert.Equal(t, DefaultChatTemplate, tmpl.ValueString())
	toks, ok := kv.Get("tokenizer.ggml.tokens")
	require.True(t, ok)
	assert.Equal(t, tokens, toks.ValueArray().ValuesString())
	ft, _ := kv.Get("general.file_type")
	assert.EqualValues(t, 0, ft.ValueUint32())
}

func TestSynthLargeIsF16(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 55 MB")
	}
	path := filepath.Join(t.TempDir(), "large.gguf")
	require.NoError(t, SynthFile(path, Large()))
	gf := parse(t, path)
	assert.EqualValues(t, 512, gf.Architecture().EmbeddingLength)
	assert.EqualValues(t, 8, gf.Architecture().BlockCount)
	for _, ti := range gf.TensorInfos {
		if len(ti.Dimensions) == 2 {
			assert.EqualValues(t, TensorF16, ti.Type, ti.Name)
		} else {
			assert.EqualValues(t, TensorF32, ti.Type, ti.Name)
		}
	}
}

func TestSynthDeterministic(t *testing.T) {
	sum := func(cfg SynthConfig) [32]byte {
		var b bytes.Buffer
		require.NoError(t, Synth(&b, cfg))
		return sha256.Sum256(b.Bytes())
	}
	a, b := sum(Tiny()), sum(Tiny())
	assert.Equal(t, a, b, "same seed, same bytes")
	other := Tiny()
	other.Seed++
	assert.NotEqual(t, a, sum(other), "other seed, other bytes")
	f16 := Tiny()
	f16.F16 = true
	assert.Equal(t, sum(f16), sum(f16))
	q8 := Tiny()
	q8.Q8_0 = true
	assert.Equal(t, sum(q8), sum(q8))
	assert.NotEqual(t, sum(f16), sum(q8))
}

func TestSynthBadConfig(t *testing.T) {
	cfg := Tiny()
	cfg.Heads = 3
	assert.Error(t, Synth(&bytes.Buffer{}, cfg))
	cfg = Tiny()
	cfg.Layers = 0
	assert.Error(t, Synth(&bytes.Buffer{}, cfg))
	// SynthFile leaves nothing behind on failure.
	dir := t.TempDir()
	assert.Error(t, SynthFile(filepath.Join(dir, "bad.gguf"), cfg))
	entries, _ := os.ReadDir(dir)
	assert.Empty(t, entries)
}
