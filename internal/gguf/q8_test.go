package gguf

import (
	"bytes"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// dequantizeQ8_0 is the inverse of QuantizeQ8_0, as ggml computes it.
func dequantizeQ8_0(b []byte) (vals []float32, scales []float32) {
	for len(b) >= Q8_0BlockBytes {
		d := Float16ToFloat32(binary.LittleEndian.Uint16(b))
		scales = append(scales, d)
		for _, q := range b[2:Q8_0BlockBytes] {
			vals = append(vals, d*float32(int8(q)))
		}
		b = b[Q8_0BlockBytes:]
	}
	return vals, scales
}

func TestQuantizeQ8_0RoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var x []float32
	// Scales whose d is a normal float16, as for every matrix Synth writes.
	for _, scale := range []float64{1, 0.01, 0.3, 40, 3e4} {
		for range 4 * Q8_0BlockSize {
			x = append(x, float32((2*r.Float64()-1)*scale))
		}
	}
	// A block with one outlier, and one of a single sign.
	outlier := make([]float32, Q8_0BlockSize)
	for i := range outlier {
		outlier[i] = float32(i) / 100
	}
	outlier[7] = -5
	x = append(x, outlier...)
	for i := range Q8_0BlockSize {
		x = append(x, float32(i+1))
	}

	b := QuantizeQ8_0(x)
	require.Len(t, b, len(x)/Q8_0BlockSize*Q8_0BlockBytes)
	got, scales := dequantizeQ8_0(b)
	require.Len(t, got, len(x))
	for blk, d := range scales {
		xs := x[blk*Q8_0BlockSize : (blk+1)*Q8_0BlockSize]
		var amax float64
		for _, v := range xs {
			amax = max(amax, math.Abs(float64(v)))
		}
		assert.InEpsilon(t, amax/127, d, 1e-3, "block %d: d = max|x|/127 (to float16)", blk)
		for i, v := range xs {
			q := int8(b[blk*Q8_0BlockBytes+2+i])
			assert.GreaterOrEqual(t, q, int8(-127), "block %d", blk)
			err := math.Abs(float64(got[blk*Q8_0BlockSize+i]) - float64(v))
			assert.LessOrEqual(t, err, float64(d)/2*(1+1e-6), "block %d value %d: %g became %g (d %g)", blk, i, v, got[blk*Q8_0BlockSize+i], d)
		}
	}
	// The largest magnitude maps to ±127.
	last := b[len(b)-Q8_0BlockBytes:]
	assert.Equal(t, int8(127), int8(last[2+Q8_0BlockSize-1]))
	ob := b[len(b)-2*Q8_0BlockBytes:]
	assert.Equal(t, int8(-127), int8(ob[2+7]))
}

func TestQuantizeQ8_0Zeros(t *testing.T) {
	b := QuantizeQ8_0(make([]float32, 2*Q8_0BlockSize))
	assert.Equal(t, make([]byte, 2*Q8_0BlockBytes), b, "scale 0, quants 0")
	// Negative zero too.
	x := make([]float32, Q8_0BlockSize)
	for i := range x {
		x[i] = float32(math.Copysign(0, -1))
	}
	assert.Equal(t, make([]byte, Q8_0BlockBytes), QuantizeQ8_0(x))
	// A block too small for a float16 scale is zeros too.
	for i := range x {
		x[i] = float32(i) * 1e-7
	}
	assert.Equal(t, make([]byte, Q8_0BlockBytes), QuantizeQ8_0(x))
	assert.Panics(t, func() { QuantizeQ8_0(make([]float32, Q8_0BlockSize+1)) })
}

func TestFloat16ToFloat32(t *testing.T) {
	for h := 0; h < 1<<16; h++ {
		f := Float16ToFloat32(uint16(h))
		if h&0x7c00 == 0x7c00 && h&0x3ff != 0 {
			assert.True(t, math.IsNaN(float64(f)), "%#04x", h)
			continue
		}
		require.Equal(t, uint16(h), Float32ToFloat16(f), "%#04x → %g", h, f)
	}
	assert.Equal(t, float32(1), Float16ToFloat32(0x3c00))
	assert.Equal(t, float32(5.960464477539063e-08), Float16ToFloat32(0x0001))
	assert.Equal(t, float32(65504), Float16ToFloat32(0x7bff))
}

func TestWriterQ8_0(t *testing.T) {
	w := NewWriter()
	x := make([]float32, 2*Q8_0BlockSize*3)
	for i := range x {
		x[i] = float32(i) - 90
	}
	w.AddTensorQ8_0("q", []uint64{2 * Q8_0BlockSize, 3}, x)
	w.AddTensorF32("after", []uint64{1}, []float32{1})
	var buf bytes.Buffer
	_, err := w.WriteTo(&buf)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "q.gguf")
	require.NoError(t, os.WriteFile(path, buf.Bytes(), 0o644))
	gf := parse(t, path)
	require.Len(t, gf.TensorInfos, 2)
	ti := gf.TensorInfos[0]
	assert.EqualValues(t, TensorQ8_0, ti.Type)
	assert.EqualValues(t, 6*Q8_0BlockBytes, ti.Bytes())
	assert.EqualValues(t, align(6*Q8_0BlockBytes, DefaultAlignment), gf.TensorInfos[1].Offset)
	start := int(gf.TensorDataStartOffset)
	assert.Equal(t, QuantizeQ8_0(x), buf.Bytes()[start:start+6*Q8_0BlockBytes])

	w = NewWriter()
	w.AddTensorQ8_0("bad", []uint64{48, 2}, make([]float32, 96))
	_, err = w.WriteTo(&bytes.Buffer{})
	assert.ErrorContains(t, err, "multiple of 32")
}

func TestSynthQ8_0(t *testing.T) {
	cfg := Tiny()
	cfg.Q8_0 = true
	path := filepath.Join(t.TempDir(), "tiny-q8.gguf")
	require.NoError(t, SynthFile(path, cfg))
	gf := parse(t, path)
	ft, _ := gf.Header.MetadataKV.Get("general.file_type")
	assert.EqualValues(t, 7, ft.ValueUint32(), "LLAMA_FTYPE_MOSTLY_Q8_0")
	for _, ti := range gf.TensorInfos {
		if len(ti.Dimensions) == 2 {
			assert.EqualValues(t, TensorQ8_0, ti.Type, ti.Name)
		} else {
			assert.EqualValues(t, TensorF32, ti.Type, ti.Name)
		}
	}
	assert.Equal(t, "Q8_0", cfg.WeightType())

	bad := cfg
	bad.FF = 100
	assert.ErrorContains(t, Synth(&bytes.Buffer{}, bad), "multiples of 32")
}

// TestSynthSizes checks Params and TensorBytes against what the file holds.
func TestSynthSizes(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*SynthConfig)
	}{
		{"F32", func(*SynthConfig) {}},
		{"F16", func(c *SynthConfig) { c.F16 = true }},
		{"Q8_0", func(c *SynthConfig) { c.Q8_0 = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Tiny()
			tc.mod(&cfg)
			assert.Equal(t, tc.name, cfg.WeightType())
			path := filepath.Join(t.TempDir(), "m.gguf")
			require.NoError(t, SynthFile(path, cfg))
			gf := parse(t, path)
			var params, data uint64
			for _, ti := range gf.TensorInfos {
				params += uint64(ti.Elements())
				data += align(uint64(ti.Bytes()), DefaultAlignment)
			}
			assert.EqualValues(t, params, cfg.Params())
			assert.EqualValues(t, data, cfg.TensorBytes())
			st, err := os.Stat(path)
			require.NoError(t, err)
			assert.EqualValues(t, st.Size(), gf.TensorDataStartOffset+cfg.TensorBytes(), "the file is its header and its tensor data")
		})
	}
}

// TestMemoryBoundConfig checks the figures MemoryBound's comment gives,
// without writing the 1 GB file.
func TestMemoryBoundConfig(t *testing.T) {
	cfg := MemoryBound()
	require.NoError(t, cfg.validate())
	assert.Equal(t, "F16", cfg.WeightType())
	assert.InDelta(t, 412e6, float64(cfg.Params()), 1e6)
	assert.InDelta(t, 0.825e9, float64(cfg.TensorBytes()), 1e6)
	// The KV cache (F16 K and V) is 64 KiB a token, as bench's concMemCtx says.
	assert.Equal(t, 64<<10, 2*2*cfg.Layers*cfg.Embd)
}
