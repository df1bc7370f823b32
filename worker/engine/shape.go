package engine

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hybridgroup/yzma/pkg/llama"
)

// Choosing a model's lanes by measuring (LoadOptions.MeasureLanes).
//
// Two shapes decode a model's slots on a CPU of T threads: one lane (one
// llama context) decoding every sequence in one batch with T threads, or
// min(slots, T) lanes of one thread each, a lane that has work alone using
// all T. The first reads the weights once per step for every sequence;
// the second avoids ggml's per-operation thread barriers, which dominate
// small matrices. On one 2-core VM of this project the second won at 2 and
// 8 requests on a 26 M model; on another, with a slower core and the same
// model, the first won at every count by up to 2×. So the worker measures:
// each shape decodes 1, 2, 4 and 8 sequences (up to the slots) for a few
// steps of a short synthetic context, twice, interleaved, keeping each
// cell's best time (noise only slows); the shape whose worst ratio to the
// better one is higher wins, a tie going to one lane.

// shapeCellTime is about how long one shape decodes one sequence count;
// shapeMaxSteps bounds a cell of a tiny model.
const (
	shapeCellTime = 40 * time.Millisecond
	shapeMinSteps = 3
	shapeMaxSteps = 32
	shapeCtx      = 64 // tokens of context per sequence while measuring
	shapePrompt   = 8  // tokens fed to each sequence before the timed steps
	shapeRounds   = 2
)

// measureShape is what Load measures with; tests put a fixed shape here.
var measureShape = (*llamaModel).measure

// measure decodes a synthetic workload with both shapes and returns the
// one to use. threads is the machine's (or the asked) thread count.
func (m *llamaModel) measure(ctx context.Context, slots, threads int) (Shape, error) {
	one := Shape{Lanes: 1, Threads: threads}
	spread := min(slots, threads)
	if spread < 2 {
		return one, nil
	}
	counts := []int{}
	for _, n := range []int{1, 2, 4, 8} {
		if n <= slots {
			counts = append(counts, n)
		}
	}
	maxSeq := counts[len(counts)-1]
	shapes := []*shapeRun{
		{lanes: 1, total: threads},
		{lanes: spread, total: threads},
	}
	defer func() {
		for _, s := range shapes {
			s.free()
		}
	}()
	for _, s := range shapes {
		if err := s.init(m, maxSeq); err != nil {
			return one, err
		}
	}
	for range shapeRounds {
		for _, n := range counts {
			for _, s := range shapes {
				if err := ctx.Err(); err != nil {
					return one, err
				}
				if err := s.measure(m, n); err != nil {
					return one, err
				}
			}
		}
	}
	worst := make([]float64, len(shapes))
	var b strings.Builder
	for i, s := range shapes {
		worst[i] = 1
		for _, n := range counts {
			best := 0.0
			for _, o := range shapes {
				best = max(best, o.rate[n])
			}
			worst[i] = min(worst[i], s.rate[n]/best)
		}
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%d lane(s):", s.lanes)
		for _, n := range counts {
			fmt.Fprintf(&b, " %d seq %.0f tok/s", n, s.rate[n])
		}
	}
	if worst[1] > worst[0] {
		return Shape{Lanes: spread, Threads: 1, Shared: true, Measured: b.String()}, nil
	}
	one.Measured = b.String()
	return one, nil
}

// shapeRun is one shape's contexts while measuring, and what it decoded.
type shapeRun struct {
	lanes, total int
	ctxs         []llamaContext
	batches      []llama.Batch
	threads      []int
	pos          []int           // the next position of every sequence of a lane
	rate         map[int]float64 // sequences → best tokens/s
}

func (s *shapeRun) init(m *llamaModel, maxSeq int) error {
	s.rate = map[int]float64{}
	per := (maxSeq + s.lanes - 1) / s.lanes
	for range s.lanes {
		c, err := newContext(m, per, shapeCtx, max(1, s.total/s.lanes))
		if err != nil {
			return err
		}
		s.ctxs = append(s.ctxs, c)
		s.batches = append(s.batches, llama.BatchInit(int32(c.nBatch), 0, 1))
		s.threads = append(s.threads, max(1, s.total/s.lanes))
		s.pos = append(s.pos, 0)
	}
	return nil
}

func (s *shapeRun) free() {
	for i, c := range s.ctxs {
		_ = llama.BatchFree(s.batches[i])
		_ = llama.Free(c.lctx)
	}
	s.ctxs, s.batches = nil, nil
}

// measure decodes n sequences spread over the lanes as pickLane would
// (round robin), each lane with its share of the threads, and keeps the
// rate if it is the best yet.
func (s *shapeRun) measure(m *llamaModel, n int) error {
	perLane := make([]int, s.lanes)
	for i := range n {
		perLane[i%s.lanes]++
	}
	busy := 0
	for _, k := range perLane {
		if k > 0 {
			busy++
		}
	}
	var errs []error
	var mu sync.Mutex
	run := func(nSteps int, feed bool) time.Duration {
		var wg sync.WaitGroup
		t0 := time.Now()
		for li, k := range perLane {
			if k == 0 {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := s.decodeLane(m, li, k, s.total/busy, nSteps, feed); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return time.Since(t0)
	}
	run(1, true) // clear, feed the prompts, one step
	one := run(1, false)
	if len(errs) > 0 {
		return errs[0]
	}
	// The first step after the prompt says how many make a cell.
	steps := shapeMinSteps
	if one > 0 {
		steps = max(shapeMinSteps, min(shapeMaxSteps, int(shapeCellTime/one)))
	}
	took := run(steps, false)
	if len(errs) > 0 {
		return errs[0]
	}
	rate := float64(n*steps) / took.Seconds()
	s.rate[n] = max(s.rate[n], rate)
	return nil
}

// decodeLane decodes k sequences on lane li with threads threads: with
// feed, the cache is cleared and each sequence gets shapePrompt tokens
// first; then steps steps of one token each, every token's logits asked
// for, as in generation.
func (s *shapeRun) decodeLane(m *llamaModel, li, k, threads, steps int, feed bool) error {
	c, b := s.ctxs[li], &s.batches[li]
	if s.threads[li] != threads {
		llama.SetNThreads(c.lctx, int32(threads), int32(threads))
		s.threads[li] = threads
	}
	tok := func(seq, pos int) llama.Token {
		return llama.Token((seq*131 + pos*31 + 7) % int(m.nVocab))
	}
	decode := func() error {
		rc, err := llama.Decode(c.lctx, *b)
		if err == nil && rc != 0 {
			err = fmt.Errorf("llama_decode returned %d", rc)
		}
		return err
	}
	id := []llama.SeqId{0}
	if feed {
		_ = llama.MemoryClear(c.mem, true)
		_ = b.Clear()
		for seq := range k {
			id[0] = llama.SeqId(seq)
			for pos := range shapePrompt {
				_ = b.Add(tok(seq, pos), llama.Pos(pos), id, pos == shapePrompt-1)
			}
		}
		if err := decode(); err != nil {
			return fmt.Errorf("engine: measuring lanes: %w", err)
		}
		s.pos[li] = shapePrompt
	}
	for range steps {
		if s.pos[li] >= shapeCtx {
			return nil // the context is full: the rate is what was timed
		}
		_ = b.Clear()
		for seq := range k {
			id[0] = llama.SeqId(seq)
			_ = b.Add(tok(seq, s.pos[li]), llama.Pos(s.pos[li]), id, true)
		}
		if err := decode(); err != nil {
			return fmt.Errorf("engine: measuring lanes: %w", err)
		}
		s.pos[li]++
	}
	return nil
}
