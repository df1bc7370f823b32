package catalog_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/internal/gguf"
)

// TestAddTruncatedGGUF checks that a model file cut short (a copy or a
// download that stopped early) is reported as truncated, with the sizes,
// rather than as whatever the parser trips over first ("a tensor type's
// block layout does not match").
func TestAddTruncatedGGUF(t *testing.T) {
	data := tiny(t)
	l, err := gguf.ReadLayout(bytes.NewReader(data))
	require.NoError(t, err)
	start := int(l.DataStart)
	cases := []struct {
		name     string
		cut      int
		contains []string
	}{
		{"one byte short", len(data) - 1, []string{"bytes of tensor data", "the file has " + strconv.Itoa(len(data)-1-start)}},
		{"half the data", start + (len(data)-start)/2, []string{"bytes of tensor data", "the file has " + strconv.Itoa((len(data)-start)/2)}},
		{"no data", start, []string{"bytes of tensor data", "the file has 0 "}},
		{"inside the header", start / 2, []string{"ends inside its header"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "cut.gguf")
			require.NoError(t, os.WriteFile(path, data[:tc.cut], 0o644))
			c := open(t)
			_, err := c.Add(context.Background(), catalog.AddRequest{Source: "file://" + path}, nil)
			require.ErrorIs(t, err, catalog.ErrNotGGUF)
			msg := err.Error()
			for _, s := range append(tc.contains, "truncated", "it is "+strconv.Itoa(tc.cut)+" bytes", "stopped early") {
				assert.Contains(t, msg, s)
			}
			assert.NotContains(t, msg, "block layout")
			requireNothingLeft(t, c, "cut")
		})
	}
}
