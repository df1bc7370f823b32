package gguf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// ErrTruncated is returned by ReadLayout for a file that ends inside its
// header: its metadata, its tensor infos or the padding before the data.
var ErrTruncated = errors.New("gguf: the file ends inside its header")

// Layout is where the parts of a GGUF file lie, read from its header alone:
// what a caller needs to tell a file cut short from a malformed one, which a
// full parser reports alike.
type Layout struct {
	Version   uint32
	Alignment uint64
	// DataStart is the offset of the tensor data: the header, metadata,
	// tensor infos and padding come before it.
	DataStart int64
	Tensors   []TensorInfo
}

// TensorInfo is one tensor's entry in the header.
type TensorInfo struct {
	Name string
	Dims []uint64
	Type TensorType
	// Offset is where the tensor's data starts, from DataStart.
	Offset uint64
}

// ReadLayout reads a GGUF header (v2 or v3) from r, which must be at the
// start of the file, and stops where the tensor data begins. A header cut
// short gives an error wrapping ErrTruncated; one that is malformed, another
// error. Counts and lengths are never trusted for allocation: a corrupt
// length ends in an error, not in a huge buffer.
func ReadLayout(r io.Reader) (Layout, error) {
	d := &decoder{r: r}
	var l Layout
	if magic := d.bytes(4); d.err == nil && string(magic) != Magic {
		return l, fmt.Errorf("gguf: magic %q is not %q", magic, Magic)
	}
	l.Version = d.u32()
	if d.err == nil && l.Version != 2 && l.Version != 3 {
		return l, fmt.Errorf("gguf: version %d is not supported", l.Version)
	}
	tensors, kvs := d.u64(), d.u64()
	l.Alignment = DefaultAlignment
	for i := uint64(0); i < kvs && d.err == nil; i++ {
		key := d.str()
		typ := ValueType(d.u32())
		if key == "general.alignment" && typ == TypeUint32 {
			if a := d.u32(); a > 0 {
				l.Alignment = uint64(a)
			}
			continue
		}
		d.skipValue(typ, 0)
	}
	for i := uint64(0); i < tensors && d.err == nil; i++ {
		t := TensorInfo{Name: d.str()}
		n := d.u32()
		if n > 8 { // GGML_MAX_DIMS is 4; anything near this is corrupt
			d.fail(fmt.Errorf("gguf: tensor %q has %d dimensions", t.Name, n))
			break
		}
		for j := uint32(0); j < n; j++ {
			t.Dims = append(t.Dims, d.u64())
		}
		t.Type = TensorType(d.u32())
		t.Offset = d.u64()
		l.Tensors = append(l.Tensors, t)
	}
	if d.err == nil {
		if pad := (l.Alignment - uint64(d.n)%l.Alignment) % l.Alignment; pad > 0 {
			d.skip(pad)
		}
	}
	l.DataStart = d.n
	return l, d.err
}

// decoder reads little-endian GGUF values, counting bytes; the first error
// sticks and turns every later read into a no-op.
type decoder struct {
	r   io.Reader
	n   int64
	err error
	buf [8]byte
}

func (d *decoder) fail(err error) {
	if d.err == nil {
		d.err = err
	}
}

func (d *decoder) read(p []byte) {
	if d.err != nil {
		return
	}
	n, err := io.ReadFull(d.r, p)
	d.n += int64(n)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		d.fail(fmt.Errorf("%w (at byte %d)", ErrTruncated, d.n))
	} else if err != nil {
		d.fail(err)
	}
}

func (d *decoder) skip(n uint64) {
	if d.err != nil {
		return
	}
	got, err := io.CopyN(io.Discard, d.r, int64(min(n, 1<<62)))
	d.n += got
	if errors.Is(err, io.EOF) {
		d.fail(fmt.Errorf("%w (at byte %d)", ErrTruncated, d.n))
	} else if err != nil {
		d.fail(err)
	}
}

func (d *decoder) bytes(n int) []byte {
	b := make([]byte, n)
	d.read(b)
	return b
}

func (d *decoder) u32() uint32 {
	d.read(d.buf[:4])
	if d.err != nil {
		return 0
	}
	return binary.LittleEndian.Uint32(d.buf[:4])
}

func (d *decoder) u64() uint64 {
	d.read(d.buf[:8])
	if d.err != nil {
		return 0
	}
	return binary.LittleEndian.Uint64(d.buf[:8])
}

// maxString bounds a key or tensor name; real ones are tens of bytes.
const maxString = 1 << 16

func (d *decoder) str() string {
	n := d.u64()
	if d.err == nil && n > maxString {
		d.fail(fmt.Errorf("gguf: a %d-byte name at byte %d", n, d.n))
	}
	if d.err != nil {
		return ""
	}
	return string(d.bytes(int(n)))
}

// scalarSize is the size of each fixed-size value type.
var scalarSize = map[ValueType]uint64{
	TypeUint8: 1, TypeInt8: 1, TypeBool: 1, TypeUint16: 2, TypeInt16: 2,
	TypeUint32: 4, TypeInt32: 4, TypeFloat32: 4, TypeUint64: 8, TypeInt64: 8, TypeFloat64: 8,
}

// skipValue skips one metadata value of type typ; depth bounds nested arrays.
func (d *decoder) skipValue(typ ValueType, depth int) {
	if d.err != nil {
		return
	}
	if size, ok := scalarSize[typ]; ok {
		d.skip(size)
		return
	}
	switch typ {
	case TypeString:
		d.skip(d.u64()) // values (a chat template) may be long; skip streams
	case TypeArray:
		elem := ValueType(d.u32())
		n := d.u64()
		if size, ok := scalarSize[elem]; ok {
			if n > (1<<62)/size {
				d.fail(fmt.Errorf("gguf: an array of %d values at byte %d", n, d.n))
				return
			}
			d.skip(n * size)
			return
		}
		if depth >= 4 {
			d.fail(fmt.Errorf("gguf: arrays nested too deep at byte %d", d.n))
			return
		}
		for i := uint64(0); i < n && d.err == nil; i++ {
			d.skipValue(elem, depth+1)
		}
	default:
		d.fail(fmt.Errorf("gguf: unknown value type %d at byte %d", typ, d.n))
	}
}
