package gguf

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestReadLayoutAgreesWithParser reads a generated model's header and
// checks it against gguf-parser-go: same data start, same tensors.
func TestReadLayoutAgreesWithParser(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, SynthFile(path, Tiny()))
	gf := parse(t, path)

	var buf bytes.Buffer
	require.NoError(t, Synth(&buf, Tiny()))
	l, err := ReadLayout(bytes.NewReader(buf.Bytes()))
	require.NoError(t, err)
	assert.EqualValues(t, 3, l.Version)
	assert.EqualValues(t, DefaultAlignment, l.Alignment)
	assert.Equal(t, gf.TensorDataStartOffset, l.DataStart)
	require.Len(t, l.Tensors, len(gf.TensorInfos))
	for i, ti := range gf.TensorInfos {
		got := l.Tensors[i]
		assert.Equal(t, ti.Name, got.Name)
		assert.Equal(t, ti.Dimensions, got.Dims, ti.Name)
		assert.EqualValues(t, ti.Type, got.Type, ti.Name)
		assert.Equal(t, ti.Offset, got.Offset, ti.Name)
	}
}

// TestReadLayoutTruncatedHeader checks that a file cut anywhere inside its
// header is reported as truncated, and one cut inside its data is not (the
// header is whole; judging the data is the caller's part).
func TestReadLayoutTruncatedHeader(t *testing.T) {
	var buf bytes.Buffer
	require.NoError(t, Synth(&buf, Tiny()))
	data := buf.Bytes()
	whole, err := ReadLayout(bytes.NewReader(data))
	require.NoError(t, err)
	for _, cut := range []int64{0, 3, 10, 24, 100, whole.DataStart / 2, whole.DataStart - 1} {
		_, err := ReadLayout(bytes.NewReader(data[:cut]))
		assert.Truef(t, errors.Is(err, ErrTruncated), "cut at %d: %v", cut, err)
	}
	l, err := ReadLayout(bytes.NewReader(data[:whole.DataStart+1]))
	require.NoError(t, err)
	assert.Equal(t, whole.DataStart, l.DataStart)

	_, err = ReadLayout(bytes.NewReader([]byte("GGML and some more bytes")))
	require.Error(t, err)
	assert.False(t, errors.Is(err, ErrTruncated), "a wrong magic is not a truncation: %v", err)
}
