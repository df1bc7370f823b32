// Package gguf writes GGUF v3 files and synthesises small random-weight
// llama-architecture models for tests, benchmarks and offline demos.
//
// Only what the project needs is implemented: metadata of the scalar types,
// strings, and arrays of strings, float32 and int32; tensors of type F32, F16
// and Q8_0. Reading GGUF is left to github.com/gpustack/gguf-parser-go, except
// for ReadLayout, which reads only the header, to tell a truncated file from
// a malformed one.
package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// Magic is the four bytes every GGUF file starts with.
const Magic = "GGUF"

// Version is the GGUF version this package writes.
const Version = 3

// DefaultAlignment is the alignment of tensor data (general.alignment).
const DefaultAlignment = 32

// ValueType is the type tag of a metadata value.
type ValueType uint32

// Metadata value types of the GGUF specification.
const (
	TypeUint8   ValueType = 0
	TypeInt8    ValueType = 1
	TypeUint16  ValueType = 2
	TypeInt16   ValueType = 3
	TypeUint32  ValueType = 4
	TypeInt32   ValueType = 5
	TypeFloat32 ValueType = 6
	TypeBool    ValueType = 7
	TypeString  ValueType = 8
	TypeArray   ValueType = 9
	TypeUint64  ValueType = 10
	TypeInt64   ValueType = 11
	TypeFloat64 ValueType = 12
)

// TensorType is a ggml tensor type. Only F32, F16 and Q8_0 are written.
type TensorType uint32

// Tensor types supported by the writer.
const (
	TensorF32  TensorType = 0
	TensorF16  TensorType = 1
	TensorQ8_0 TensorType = 8
)

// Q8_0 blocks: Q8_0BlockSize weights stored in Q8_0BlockBytes bytes, a
// float16 scale then one int8 per weight (ggml's block_q8_0).
const (
	Q8_0BlockSize  = 32
	Q8_0BlockBytes = 2 + Q8_0BlockSize
)

type kv struct {
	key string
	typ ValueType
	val any
}

type tensor struct {
	name string
	dims []uint64
	typ  TensorType
	data []byte
}

// Writer accumulates metadata and tensors and writes them as one GGUF v3 file.
// Keys and tensors are written in the order they were added. It is not safe
// for concurrent use.
type Writer struct {
	kvs       []kv
	keys      map[string]bool
	tensors   []tensor
	names     map[string]bool
	alignment uint64
	err       error
}

// NewWriter returns an empty writer with the default alignment of 32 bytes.
// The alignment is written as general.alignment.
func NewWriter() *Writer {
	w := &Writer{keys: map[string]bool{}, names: map[string]bool{}, alignment: DefaultAlignment}
	w.add("general.alignment", TypeUint32, uint32(DefaultAlignment))
	return w
}

func (w *Writer) add(key string, t ValueType, v any) {
	if w.err != nil {
		return
	}
	if key == "" {
		w.err = errors.New("gguf: empty metadata key")
		return
	}
	if w.keys[key] {
		w.err = fmt.Errorf("gguf: duplicate metadata key %q", key)
		return
	}
	w.keys[key] = true
	w.kvs = append(w.kvs, kv{key, t, v})
}

// AddString adds a string value.
func (w *Writer) AddString(key, v string) { w.add(key, TypeString, v) }

// AddUint8 adds a uint8 value.
func (w *Writer) AddUint8(key string, v uint8) { w.add(key, TypeUint8, v) }

// AddInt8 adds an int8 value.
func (w *Writer) AddInt8(key string, v int8) { w.add(key, TypeInt8, v) }

// AddUint16 adds a uint16 value.
func (w *Writer) AddUint16(key string, v uint16) { w.add(key, TypeUint16, v) }

// AddInt16 adds an int16 value.
func (w *Writer) AddInt16(key string, v int16) { w.add(key, TypeInt16, v) }

// AddUint32 adds a uint32 value.
func (w *Writer) AddUint32(key string, v uint32) { w.add(key, TypeUint32, v) }

// AddInt32 adds an int32 value.
func (w *Writer) AddInt32(key string, v int32) { w.add(key, TypeInt32, v) }

// AddUint64 adds a uint64 value.
func (w *Writer) AddUint64(key string, v uint64) { w.add(key, TypeUint64, v) }

// AddInt64 adds an int64 value.
func (w *Writer) AddInt64(key string, v int64) { w.add(key, TypeInt64, v) }

// AddFloat32 adds a float32 value.
func (w *Writer) AddFloat32(key string, v float32) { w.add(key, TypeFloat32, v) }

// AddFloat64 adds a float64 value.
func (w *Writer) AddFloat64(key string, v float64) { w.add(key, TypeFloat64, v) }

// AddBool adds a bool value.
func (w *Writer) AddBool(key string, v bool) { w.add(key, TypeBool, v) }

// AddStringArray adds an array of strings.
func (w *Writer) AddStringArray(key string, v []string) { w.add(key, TypeArray, v) }

// AddFloat32Array adds an array of float32.
func (w *Writer) AddFloat32Array(key string, v []float32) { w.add(key, TypeArray, v) }

// AddInt32Array adds an array of int32.
func (w *Writer) AddInt32Array(key string, v []int32) { w.add(key, TypeArray, v) }

// AddTensorF32 adds a tensor stored as F32. dims are in ggml order (ne0
// first, the fastest-varying dimension) and their product must equal len(data).
func (w *Writer) AddTensorF32(name string, dims []uint64, data []float32) {
	if !w.checkTensor(name, dims, len(data)) {
		return
	}
	b := make([]byte, 4*len(data))
	for i, f := range data {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	w.tensors = append(w.tensors, tensor{name, append([]uint64(nil), dims...), TensorF32, b})
}

// AddTensorF16 adds a tensor stored as F16 (IEEE half precision, converted
// from data with round-to-nearest-even). dims are as for AddTensorF32.
func (w *Writer) AddTensorF16(name string, dims []uint64, data []float32) {
	if !w.checkTensor(name, dims, len(data)) {
		return
	}
	b := make([]byte, 2*len(data))
	for i, f := range data {
		binary.LittleEndian.PutUint16(b[2*i:], Float32ToFloat16(f))
	}
	w.tensors = append(w.tensors, tensor{name, append([]uint64(nil), dims...), TensorF16, b})
}

// AddTensorQ8_0 adds a tensor stored as Q8_0 (see QuantizeQ8_0). dims are as
// for AddTensorF32; the row length dims[0] must be a multiple of
// Q8_0BlockSize, as ggml quantises each row in whole blocks.
func (w *Writer) AddTensorQ8_0(name string, dims []uint64, data []float32) {
	if !w.checkTensor(name, dims, len(data)) {
		return
	}
	if dims[0]%Q8_0BlockSize != 0 {
		w.err = fmt.Errorf("gguf: tensor %q: row length %d is not a multiple of %d, as Q8_0 needs", name, dims[0], Q8_0BlockSize)
		return
	}
	w.tensors = append(w.tensors, tensor{name, append([]uint64(nil), dims...), TensorQ8_0, QuantizeQ8_0(data)})
}

func (w *Writer) checkTensor(name string, dims []uint64, n int) bool {
	if w.err != nil {
		return false
	}
	if name == "" || w.names[name] {
		w.err = fmt.Errorf("gguf: empty or duplicate tensor name %q", name)
		return false
	}
	if len(dims) == 0 || len(dims) > 4 {
		w.err = fmt.Errorf("gguf: tensor %q: %d dimensions, want 1 to 4", name, len(dims))
		return false
	}
	prod := uint64(1)
	for _, d := range dims {
		prod *= d
	}
	if prod != uint64(n) {
		w.err = fmt.Errorf("gguf: tensor %q: dims %v hold %d elements, data has %d", name, dims, prod, n)
		return false
	}
	w.names[name] = true
	return true
}

// WriteTo writes the whole file. It returns the first error met while adding
// metadata or tensors, or while writing.
func (w *Writer) WriteTo(out io.Writer) (int64, error) {
	if w.err != nil {
		return 0, w.err
	}
	cw := &countWriter{w: bufio.NewWriterSize(out, 1<<16)}
	e := &enc{w: cw}
	e.raw([]byte(Magic))
	e.u32(Version)
	e.u64(uint64(len(w.tensors)))
	e.u64(uint64(len(w.kvs)))
	for _, kv := range w.kvs {
		e.str(kv.key)
		e.value(kv.typ, kv.val)
	}
	var off uint64
	for _, t := range w.tensors {
		e.str(t.name)
		e.u32(uint32(len(t.dims)))
		for _, d := range t.dims {
			e.u64(d)
		}
		e.u32(uint32(t.typ))
		e.u64(off)
		off = align(off+uint64(len(t.data)), w.alignment)
	}
	e.pad(w.alignment)
	for _, t := range w.tensors {
		e.raw(t.data)
		e.pad(w.alignment)
	}
	if e.err == nil {
		e.err = cw.w.(*bufio.Writer).Flush()
	}
	return cw.n, e.err
}

func align(n, a uint64) uint64 { return (n + a - 1) / a * a }

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

type enc struct {
	w   *countWriter
	err error
	buf [8]byte
}

func (e *enc) raw(b []byte) {
	if e.err == nil {
		_, e.err = e.w.Write(b)
	}
}

func (e *enc) u8(v uint8)   { e.raw([]byte{v}) }
func (e *enc) u16(v uint16) { binary.LittleEndian.PutUint16(e.buf[:], v); e.raw(e.buf[:2]) }
func (e *enc) u32(v uint32) { binary.LittleEndian.PutUint32(e.buf[:], v); e.raw(e.buf[:4]) }
func (e *enc) u64(v uint64) { binary.LittleEndian.PutUint64(e.buf[:], v); e.raw(e.buf[:8]) }
func (e *enc) str(s string) { e.u64(uint64(len(s))); e.raw([]byte(s)) }

func (e *enc) pad(a uint64) {
	if rem := uint64(e.w.n) % a; rem != 0 {
		e.raw(make([]byte, a-rem))
	}
}

func (e *enc) value(t ValueType, v any) {
	e.u32(uint32(t))
	switch x := v.(type) {
	case uint8:
		e.u8(x)
	case int8:
		e.u8(uint8(x))
	case uint16:
		e.u16(x)
	case int16:
		e.u16(uint16(x))
	case uint32:
		e.u32(x)
	case int32:
		e.u32(uint32(x))
	case uint64:
		e.u64(x)
	case int64:
		e.u64(uint64(x))
	case float32:
		e.u32(math.Float32bits(x))
	case float64:
		e.u64(math.Float64bits(x))
	case bool:
		if x {
			e.u8(1)
		} else {
			e.u8(0)
		}
	case string:
		e.str(x)
	case []string:
		e.u32(uint32(TypeString))
		e.u64(uint64(len(x)))
		for _, s := range x {
			e.str(s)
		}
	case []float32:
		e.u32(uint32(TypeFloat32))
		e.u64(uint64(len(x)))
		for _, f := range x {
			e.u32(math.Float32bits(f))
		}
	case []int32:
		e.u32(uint32(TypeInt32))
		e.u64(uint64(len(x)))
		for _, i := range x {
			e.u32(uint32(i))
		}
	default:
		if e.err == nil {
			e.err = fmt.Errorf("gguf: unsupported value %T", v)
		}
	}
}

// Float32ToFloat16 converts f to IEEE 754 half precision bits, rounding to
// nearest even; values too large become ±Inf and NaN stays NaN.
func Float32ToFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	switch {
	case exp == 0xff: // Inf or NaN
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp == 0 && mant == 0:
		return sign
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		// Subnormal half (or zero).
		if e < -10 {
			return sign
		}
		m := mant | 0x800000
		shift := uint32(14 - e)
		half := m >> shift
		rem := m & (1<<shift - 1)
		mid := uint32(1) << (shift - 1)
		if rem > mid || (rem == mid && half&1 == 1) {
			half++
		}
		return sign | uint16(half)
	}
	half := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && half&1 == 1) {
		half++ // may carry into the exponent, which is still correct
	}
	return sign | uint16(half)
}

// Float16ToFloat32 converts IEEE 754 half precision bits to float32, which
// holds every half value exactly.
func Float16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f: // Inf or NaN
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp == 0 && mant == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal half: a normal float32
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// QuantizeQ8_0 quantises data, whose length must be a multiple of
// Q8_0BlockSize, to ggml's Q8_0: each block of 32 values becomes a float16
// scale d = max|x|/127 and 32 int8 quants q = round(x/d), so that x ≈ d·q.
// The quants are rounded against d as stored (in float16), which keeps every
// value within d/2 of the original while d is a normal float16 (max|x| at
// least 127·2⁻¹⁴, about 0.0078); below that d loses precision, and a block
// under 127·2⁻²⁵ (about 3.8e-6), zeros included, has d = 0 and zero quants.
func QuantizeQ8_0(data []float32) []byte {
	if len(data)%Q8_0BlockSize != 0 {
		panic(fmt.Sprintf("gguf: QuantizeQ8_0 of %d values, not a multiple of %d", len(data), Q8_0BlockSize))
	}
	out := make([]byte, len(data)/Q8_0BlockSize*Q8_0BlockBytes)
	for b := 0; b*Q8_0BlockSize < len(data); b++ {
		x := data[b*Q8_0BlockSize : (b+1)*Q8_0BlockSize]
		blk := out[b*Q8_0BlockBytes : (b+1)*Q8_0BlockBytes]
		var amax float32
		for _, v := range x {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		dh := Float32ToFloat16(amax / 127)
		binary.LittleEndian.PutUint16(blk, dh)
		d := Float16ToFloat32(dh)
		if d == 0 {
			continue // the quants stay zero
		}
		for i, v := range x {
			// |x/d| is at most 127 times the rounding of d to float16,
			// under 127.5; the clamp only guards the int8.
			q := math.Round(float64(v) / float64(d))
			blk[2+i] = byte(int8(max(-127, min(127, q))))
		}
	}
	return out
}
