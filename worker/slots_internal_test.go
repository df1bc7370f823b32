package worker

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/internal/gguf"
)

func TestPlanSlotsFromMemory(t *testing.T) {
	const kv = 16 << 10 // bytes per token
	base := Config{ContextSize: 2048}
	mib := uint64(1 << 20)
	small := memoryFacts{ModelBytes: 52 * mib, KVPerToken: kv, Free: 4 << 30, FreeWhat: "RAM", Cores: 2}
	big := small
	big.ModelBytes = 1 << 30

	for _, c := range []struct {
		name        string
		cfg         func(Config) Config
		facts       memoryFacts
		slots       int
		lanes       int
		threads     int
		mapped      bool // the weights stay a mapping of the file
		errContains []string
	}{
		{name: "default is the cap when memory allows", facts: small, slots: DefaultMaxSlots, lanes: 2, threads: 1},
		{name: "a big model on a CPU gets one lane with every core", facts: big, slots: DefaultMaxSlots, lanes: 1, threads: 2},
		{name: "on a GPU one lane, its weights the GPU's", facts: func() memoryFacts { f := small; f.OnGPU = true; return f }(), slots: DefaultMaxSlots, lanes: 1, threads: 2, mapped: true},
		{name: "default shrinks to what fits",
			facts: func() memoryFacts { f := small; f.Free = f.ModelBytes + 100*mib; return f }(), slots: 2, lanes: 2, threads: 1},
		{name: "asked for and fits", cfg: func(c Config) Config { c.Slots = 8; return c }, facts: small, slots: 8, lanes: 2, threads: 1},
		{name: "asked lanes and threads are kept", cfg: func(c Config) Config { c.Slots = 8; c.Lanes = 8; c.Threads = 1; return c }, facts: big, slots: 8, lanes: 8, threads: 1},
		{name: "asked for and does not fit", cfg: func(c Config) Config { c.Slots = 64; return c },
			facts:       func() memoryFacts { f := small; f.Free = f.ModelBytes + 1<<30; return f }(),
			errContains: []string{"--slots 64 does not fit", "64 slots of 2048 tokens need 2.0 GiB of KV cache (32.0 MiB each)", "819.2 MiB of RAM is free after the model's 52.0 MiB", "at most 25 fit"}},
		{name: "not even one", facts: func() memoryFacts { f := small; f.Free = f.ModelBytes + 10*mib; return f }(),
			errContains: []string{"not even one slot fits", "choose a smaller --ctx"}},
		{name: "unknown free memory: the cap, and the weights mapped", facts: memoryFacts{FreeIsUnknown: true, Cores: 2}, slots: DefaultMaxSlots, lanes: 2, threads: 1, mapped: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := base
			if c.cfg != nil {
				cfg = c.cfg(cfg)
			}
			p, err := planSlots(cfg, c.facts)
			if c.errContains != nil {
				require.Error(t, err)
				assert.True(t, errors.Is(err, ErrNoMemory))
				for _, s := range c.errContains {
					assert.Contains(t, err.Error(), s)
				}
				return
			}
			require.NoError(t, err)
			assert.Equal(t, c.slots, p.Slots, "slots")
			assert.Equal(t, c.lanes, p.Lanes, "lanes")
			assert.Equal(t, c.threads, p.Threads, "threads")
			assert.Equal(t, !c.mapped, p.Resident, "weights resident")
			assert.Equal(t, c.facts.KVPerToken*2048, p.KVPerSlot)
		})
	}
}

// The KV cache per token comes from the model's dimensions: keys and
// values of every layer, F16.
func TestKVBytesPerToken(t *testing.T) {
	p := filepath.Join(t.TempDir(), "large.gguf")
	cfg := gguf.Tiny()
	require.NoError(t, gguf.SynthFile(p, cfg))
	n, err := kvBytesPerToken(p)
	require.NoError(t, err)
	assert.Equal(t, uint64(cfg.Layers*2*cfg.Embd*2), n)
}
